#!/usr/bin/env bash
# Train (or sample) on a Cloud TPU pod slice: the same command runs on every worker; JAX finds the coordinator.
#
#   bash launch/tpu_pod.sh TPU_NAME ZONE configs/imagenet256_uvit_h2.py gs://BUCKET/runs/in256_h2 [--mode sample ...]
#
# Every worker clones/updates the repo at ~/uvit-jax (set REPO_URL), installs requirements with jax[tpu] and runs
# main.py with UVIT_DISTRIBUTED=1 (bare jax.distributed.initialize()). Re-running the command after a preemption
# resumes from the newest checkpoint in the workdir.
set -euo pipefail
if [ $# -lt 4 ]; then echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [main.py flags...]" >&2; exit 2; fi
TPU_NAME=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
REPO_URL=${REPO_URL:?set REPO_URL to the git URL of this repository}
EXTRA="$*"
JAX_VERSION=$(grep '^jax==' "$(dirname "$0")/../requirements.txt" | cut -d= -f3)
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  [ -d ~/uvit-jax ] || git clone $REPO_URL ~/uvit-jax
  cd ~/uvit-jax && git pull --ff-only
  [ -d .venv ] || python3 -m venv .venv
  .venv/bin/pip install -q -r requirements.txt 'jax[tpu]==$JAX_VERSION'
  UVIT_DISTRIBUTED=1 .venv/bin/python main.py --config $CONFIG --workdir $WORKDIR $EXTRA
"
