#!/usr/bin/env bash
# Several jax.distributed processes on this machine (CPU devices), to try multi-host behaviour locally.
set -euo pipefail
ME="launch/local_multiprocess.sh"

usage() {
  cat <<EOF
usage: bash $ME NPROC NDEV CONFIG WORKDIR [main.py flags...]

Starts NPROC processes of 'python main.py --config CONFIG --workdir WORKDIR [flags]', each with NDEV CPU devices
(NPROC x NDEV global devices), joined through JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT, JAX_NUM_PROCESSES and
JAX_PROCESS_ID; waits for all and exits with the last non-zero status (0 if all succeed). Output of all
processes goes to this terminal. Ctrl-C or SIGTERM is passed to every process.
Example: bash $ME 2 4 configs/test_tiny.py runs/mp
Environment: PORT (default random in 20000-39999), PYTHON (default python).
EOF
}

case "${1:-}" in -h|--help) usage; exit 0 ;; esac
if [ $# -lt 4 ]; then echo "$ME: error: need NPROC NDEV CONFIG WORKDIR" >&2; echo >&2; usage >&2; exit 2; fi
NPROC=$1; NDEV=$2; CONFIG=$3; WORKDIR=$4
shift 4
for n in "$NPROC" "$NDEV"; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "$ME: error: NPROC and NDEV must be positive integers, got '$n'" >&2; usage >&2; exit 2; }
done
[ -f "$CONFIG" ] || { echo "$ME: error: config file $CONFIG not found" >&2; exit 2; }
PORT=${PORT:-$((20000 + RANDOM % 20000))}
PY=${PYTHON:-python}
pids=()
# Background processes of a script ignore SIGINT, so Ctrl-C has to be passed on by hand.
# shellcheck disable=SC2317  # called by the trap
stop() { TRAPPED=1; kill -TERM "${pids[@]}" 2>/dev/null || true; }
trap stop INT TERM
for ((i = 0; i < NPROC; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$NDEV" \
  JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" JAX_NUM_PROCESSES=$NPROC JAX_PROCESS_ID=$i \
    "$PY" main.py --config "$CONFIG" --workdir "$WORKDIR" "$@" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do
  # A trapped signal interrupts wait (status > 128, process maybe still running): wait again for its own status.
  while :; do
    TRAPPED=0 s=0
    wait "$p" || s=$?
    [ "$TRAPPED" = 1 ] || break
  done
  [ "$s" = 0 ] || rc=$s
done
exit "$rc"
