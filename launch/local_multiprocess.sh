#!/usr/bin/env bash
# Several jax.distributed processes on this machine (CPU devices), e.g. to try multi-host behaviour locally:
#
#   bash launch/local_multiprocess.sh 2 4 configs/test_tiny.py runs/mp [main.py flags]
#
# starts 2 processes with 4 CPU devices each (8 global devices) and waits for both.
set -euo pipefail
NPROC=${1:?number of processes}; NDEV=${2:?CPU devices per process}; CONFIG=${3:?config}; WORKDIR=${4:?workdir}
shift 4
PORT=${PORT:-$((20000 + RANDOM % 20000))}
PY=${PYTHON:-python}
pids=()
for ((i = 0; i < NPROC; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$NDEV" \
  JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" JAX_NUM_PROCESSES=$NPROC JAX_PROCESS_ID=$i \
    $PY main.py --config "$CONFIG" --workdir "$WORKDIR" "$@" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
