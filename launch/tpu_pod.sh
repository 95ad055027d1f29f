#!/usr/bin/env bash
# Train (or sample) on a Cloud TPU VM slice: create or reuse the TPU, put this code on every worker, install the
# pinned requirements with jax[tpu], start main.py on all workers, stream worker 0's log. `--help` for the options.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ME="launch/tpu_pod.sh"
# shellcheck disable=SC2016  # expanded on the workers, not here
REMOTE_DIR='$HOME/uvit-jax' REMOTE_LOGS='$HOME/uvit-jax-logs'

usage() {
  cat <<EOF
usage: bash $ME [options] TPU_NAME ZONE CONFIG WORKDIR [-- main.py flags...]
       bash $ME logs TPU_NAME ZONE [WORKER]
       bash $ME delete [--queued] [--dry-run] TPU_NAME ZONE

Run (the first form):
  0. check that the run fits: compile CONFIG (with the --config.* flags after --) here, on this machine, for
     the TPU's accelerator type with the TPU compiler (main.py --mode benchmark --benchmark_compile_only
     --benchmark_topology=TYPE; needs libtpu, from requirements.txt; 5 to 35 minutes of a 2-core machine,
     the latent configs' autoencoder decode being the longest program) and
     refuse, naming the per-chip GiB of the train step and sampler against the chip's HBM, when it does not fit.
     The type is --accelerator, or the existing TPU's; PYTHON=... names the interpreter (default python3).
     --skip-fit-check skips this;
  1. reuse TPU_NAME if 'gcloud compute tpus tpu-vm describe' finds it READY; otherwise create it
     (needs --accelerator; 'tpu-vm create', or 'queued-resources create' with --queued, waiting until ACTIVE);
  2. copy a tarball of this working tree (git-tracked and untracked-not-ignored files) to every worker's
     ~/uvit-jax, or with --git URL@REF fetch that ref there instead;
  3. install requirements.txt plus jax[tpu]==<the jax pin in requirements.txt> into ~/uvit-jax/.venv
     (a Python --python venv made by uv: the TPU images ship an older python3);
  4. on all workers (--worker=all): UVIT_DISTRIBUTED=1 nohup .venv/bin/python main.py --config CONFIG
     --workdir WORKDIR [--config.mesh.expect_devices=N] [main.py flags], each writing
     ~/uvit-jax-logs/<launch time>/worker-<i>.log (~/uvit-jax-logs/latest points at the newest launch);
  5. stream worker 0's log until the run ends, then exit with worker 0's exit status. Ctrl-C stops the stream,
     not the run; '$ME logs TPU_NAME ZONE' streams again.
WORKDIR must be visible to every worker (gs://BUCKET/...). After a preemption, run the same command again
('delete' a TPU left PREEMPTED first): the run resumes from the newest checkpoint in WORKDIR. CONFIG is a path
inside the repository (configs/...).

options:
  --accelerator TYPE   create the TPU when it does not exist, e.g. v5p-32 (16 chips), v6e-16, v5litepod-16, v4-32
  --version RUNTIME    TPU software version (default by TYPE: v4 tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite,
                       v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  --queued             create through queued resources (waits for capacity) instead of 'tpu-vm create'
  --spot               spot capacity (cheaper, preemptible)
  --skip-fit-check     do not compile CONFIG for the accelerator type before creating or reusing the TPU
  --git URL@REF        fetch REF (branch, tag or commit) of URL on every worker instead of copying this tree
  --expect-devices N   pass --config.mesh.expect_devices=N: the run stops, naming both counts, if JAX sees another
                       device count (N = chips on v4/v5p/v5e/v6e; v5p-32 has 16)
  --python X.Y         Python for the workers' venv (default 3.11, the version requirements.txt is pinned for)
  --detach             start the run and return without streaming the log
  --dry-run            print the commands (gcloud and the scripts run on the workers) without running any;
                       the same as DRY_RUN=1. The TPU is assumed absent, so creation is shown when --accelerator
                       is given.
  -h, --help           this text

The gcloud project is gcloud's default (gcloud config set project P, or CLOUDSDK_CORE_PROJECT=P).
delete removes the TPU VM, or with --queued (or when a queued resource of that name exists) the queued resource
and its TPU. WORKDIR is never touched.
EOF
}

die() { echo "$ME: error: $*" >&2; exit 2; }
fail() { echo "$ME: error: $*" >&2; exit 1; }
usage_error() { echo "$ME: error: $*" >&2; echo >&2; usage >&2; exit 2; }

DRY_RUN=${DRY_RUN:-0}
[ "$DRY_RUN" = 1 ] || DRY_RUN=0

# POSIX single quoting, so values survive the workers' login shell whatever it is.
q() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

show() { printf '+'; printf ' %q' "$@"; printf '\n'; }

# Print a local command, then run it unless this is a dry run.
run() { show "$@"; [ "$DRY_RUN" = 1 ] || "$@"; }

# Run a shell script on TPU workers (0..n-1 or all). Printed in full, so a dry run shows what the workers do.
remote() {
  local worker=$1 script=$2
  echo "+ gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=$worker --command=<<'REMOTE'"
  printf '%s\nREMOTE\n' "$script"
  [ "$DRY_RUN" = 1 ] || gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker="$worker" --command="$script"
}

stream_script() {  # tail worker logs of one launch until its process exits; exit with the run's status
  local logs="$REMOTE_LOGS/$1"
  cat <<EOF
LOGS="$logs"
pid=\$(cat "\$LOGS"/worker-*.pid)
tail -n +1 -F --pid="\$pid" "\$LOGS"/worker-*.log
status=\$(cat "\$LOGS"/worker-*.exit 2>/dev/null || echo unknown)
echo "worker finished with exit status \$status (log: \$(ls "\$LOGS"/worker-*.log))"
[ "\$status" = 0 ]
EOF
}

# ---------------------------------------------------------------------------------------------- subcommands
if [ $# -eq 0 ]; then usage_error "missing arguments"; fi
case "$1" in
  -h|--help) usage; exit 0 ;;
  logs)
    shift
    if [ $# -lt 2 ] || [ $# -gt 3 ]; then usage_error "logs needs TPU_NAME ZONE [WORKER]"; fi
    TPU=$1; ZONE=$2; WORKER=${3:-0}
    remote "$WORKER" "$(stream_script latest)"
    exit ;;
  delete)
    shift
    QUEUED=0; pos=()
    for a in "$@"; do
      case "$a" in
        --queued) QUEUED=1 ;;
        --dry-run) DRY_RUN=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) usage_error "unknown delete option $a" ;;
        *) pos+=("$a") ;;
      esac
    done
    [ ${#pos[@]} -eq 2 ] || usage_error "delete needs TPU_NAME ZONE"
    TPU=${pos[0]}; ZONE=${pos[1]}
    if [ "$QUEUED" = 0 ] && [ "$DRY_RUN" = 0 ] &&
       gcloud compute tpus queued-resources describe "$TPU" --zone="$ZONE" >/dev/null 2>&1; then
      QUEUED=1  # deleting only the node would leave the queued resource behind
    fi
    if [ "$QUEUED" = 1 ]; then
      run gcloud compute tpus queued-resources delete "$TPU" --zone="$ZONE" --force --quiet
    else
      run gcloud compute tpus tpu-vm delete "$TPU" --zone="$ZONE" --quiet
    fi
    exit ;;
esac

# ---------------------------------------------------------------------------------------------- arguments
ACCEL=""; RUNTIME=""; QUEUED=0; SPOT=0; GIT=""; EXPECT=""; PYTHON_VERSION=3.11; DETACH=0; FIT_CHECK=1
pos=(); extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --accelerator|--version|--git|--expect-devices|--python)
      [ $# -ge 2 ] || usage_error "$1 needs a value"
      case "$1" in
        --accelerator) ACCEL=$2 ;;
        --version) RUNTIME=$2 ;;
        --git) GIT=$2 ;;
        --expect-devices) EXPECT=$2 ;;
        --python) PYTHON_VERSION=$2 ;;
      esac
      shift 2; continue ;;
    --queued) QUEUED=1 ;;
    --spot) SPOT=1 ;;
    --detach) DETACH=1 ;;
    --skip-fit-check) FIT_CHECK=0 ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; extra=("$@"); break ;;
    -*) usage_error "unknown option $1 (main.py flags go after --)" ;;
    *) pos+=("$1") ;;
  esac
  shift
done
[ ${#pos[@]} -eq 4 ] || usage_error "need TPU_NAME ZONE CONFIG WORKDIR (got ${#pos[@]} positional arguments)"
TPU=${pos[0]}; ZONE=${pos[1]}; CONFIG=${pos[2]}; WORKDIR=${pos[3]}
if [ -n "$EXPECT" ] && ! [[ $EXPECT =~ ^[1-9][0-9]*$ ]]; then usage_error "--expect-devices needs a positive integer"; fi
if [ -z "$GIT" ] && [ ! -f "$ROOT/$CONFIG" ]; then die "config $CONFIG not found under $ROOT (a path like configs/x.py)"; fi
if [ -n "$GIT" ]; then
  GIT_URL=${GIT%@*}; GIT_REF=${GIT##*@}
  # Split at the last @ (ssh URLs contain one); a ref never contains ':'.
  if [ "$GIT_URL" = "$GIT" ] || [ -z "$GIT_URL" ] || [ -z "$GIT_REF" ] || [[ $GIT_REF == *:* ]]; then
    usage_error "--git needs URL@REF, e.g. https://github.com/ORG/uvit-jax.git@main"
  fi
fi
case "$WORKDIR" in gs://*) ;; *) echo "$ME: warning: WORKDIR $WORKDIR is not gs://; every worker must see the same directory" >&2 ;; esac
if [ -z "$RUNTIME" ]; then
  case "$ACCEL" in
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
    *) RUNTIME=tpu-ubuntu2204-base ;;
  esac
fi
JAX_VERSION=$(sed -n 's/^jax==\([^ ;#]*\).*/\1/p' "$ROOT/requirements.txt")
[ -n "$JAX_VERSION" ] || die "no jax==VERSION pin in requirements.txt"
STAMP=$(date -u +%Y%m%d-%H%M%S)

# ---------------------------------------------------------------------------------------------- 1. the TPU
tpu_state() { gcloud compute tpus tpu-vm describe "$TPU" --zone="$ZONE" --format='value(state)' 2>/dev/null || true; }
qr_state() { gcloud compute tpus queued-resources describe "$TPU" --zone="$ZONE" --format='value(state.state)' 2>/dev/null || true; }

wait_for_queued() {
  local state last=""
  while :; do
    state=$(qr_state)
    [ "$state" = "$last" ] || echo "queued resource $TPU: ${state:-not found}"
    last=$state
    case "$state" in
      ACTIVE) return 0 ;;
      FAILED|SUSPENDED|SUSPENDING|"") fail "queued resource $TPU is ${state:-gone}; delete it ($ME delete $TPU $ZONE) and rerun" ;;
    esac
    sleep 30
  done
}

show gcloud compute tpus tpu-vm describe "$TPU" --zone="$ZONE" --format='value(state)'
if [ "$DRY_RUN" = 1 ]; then
  state=""; echo "# dry run: assuming $TPU does not exist"
else
  state=$(tpu_state)
fi
while [[ $state =~ ^(CREATING|STARTING|RESTARTING|REPAIRING)$ ]]; do
  echo "TPU $TPU is $state; waiting for READY"; sleep 20; state=$(tpu_state)
done

# ---------------------------------------------------------------------------------------------- 0. does it fit?
fit_check() {  # compile CONFIG for accelerator type $1 here; refuse the launch when it does not fit in HBM
  local plan overrides=() a cmd
  for a in ${extra[@]+"${extra[@]}"}; do case "$a" in --config.*) overrides+=("$a") ;; esac; done
  plan=$(mktemp -d)
  cmd=("${PYTHON:-python3}" main.py --config "$CONFIG" --workdir "$plan" --mode benchmark --benchmark_compile_only
       "--benchmark_topology=$1" ${overrides[@]+"${overrides[@]}"})
  show "${cmd[@]}"
  if [ "$DRY_RUN" = 1 ]; then rm -rf "$plan"; return 0; fi
  "${cmd[@]}" > "$plan/stdout" ||
    { rm -rf "$plan"; fail "the fit check could not compile $CONFIG for $1 (above); --skip-fit-check launches anyway"; }
  verdict=$("${PYTHON:-python3}" - "$plan/benchmark.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
gb = lambda key: "not compiled" if r[key] is None else f"{r[key]:.1f} GiB"
gib = (f"train step {gb('memory_estimate_gb')}, sampler {gb('sample_memory_estimate_gb')}, FID sampler during "
       f"training {gb('fid_memory_estimate_gb')} per chip against {r['hbm_gb']} GiB of HBM")
print(("does not fit: " if r["fits"] is False else "fits: ") + gib)
PY
)
  rm -rf "$plan"
  case "$verdict" in
    fits:*) echo "fit check: $CONFIG on $1 $verdict" ;;
    *) fail "$CONFIG on $1 $verdict; try --config.mesh.fsdp=N, --config.remat_policy=block, \
--config.train.grad_accum_steps=N or a larger slice (README: Will it fit on a TPU pod?), or --skip-fit-check" ;;
  esac
}
if [ "$FIT_CHECK" = 1 ] && { [ "$state" = READY ] || [ -z "$state" ]; }; then
  type=$ACCEL
  if [ -z "$type" ] && [ "$state" = READY ]; then
    type=$(gcloud compute tpus tpu-vm describe "$TPU" --zone="$ZONE" --format='value(acceleratorType)' 2>/dev/null || true)
  fi
  if [ -z "$type" ]; then
    echo "fit check skipped: no --accelerator and no existing TPU to read the type from"
  elif [ ! -f "$ROOT/$CONFIG" ]; then
    echo "fit check skipped: $CONFIG is not in this tree (--git)"
  else
    (cd "$ROOT" && fit_check "$type")
  fi
fi
if [ "$state" = READY ]; then
  echo "reusing TPU $TPU ($ZONE)"
elif [ -n "$state" ]; then
  fail "TPU $TPU exists but is $state; start it (gcloud compute tpus tpu-vm start) or delete it ($ME delete $TPU $ZONE), then rerun"
elif [ "$DRY_RUN" = 0 ] && [ -n "$(qr_state)" ]; then
  wait_for_queued  # created earlier (maybe by an interrupted launch), still waiting for capacity
elif [ -z "$ACCEL" ]; then
  if [ "$DRY_RUN" = 1 ]; then echo "# dry run: no --accelerator, so a real run stops here unless $TPU exists"
  else fail "TPU $TPU not found in $ZONE; pass --accelerator TYPE (e.g. v5p-32) to create it"; fi
else
  spot=(); [ "$SPOT" = 0 ] || spot=(--spot)
  if [ "$QUEUED" = 1 ]; then
    run gcloud compute tpus queued-resources create "$TPU" --node-id="$TPU" --zone="$ZONE" \
      --accelerator-type="$ACCEL" --runtime-version="$RUNTIME" ${spot[@]+"${spot[@]}"}
    if [ "$DRY_RUN" = 0 ]; then wait_for_queued; fi
  else
    run gcloud compute tpus tpu-vm create "$TPU" --zone="$ZONE" --accelerator-type="$ACCEL" \
      --version="$RUNTIME" ${spot[@]+"${spot[@]}"}
  fi
fi

# ---------------------------------------------------------------------------------------------- 2+3. code, install
if [ -z "$GIT" ]; then
  TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
  TARBALL=$TMP/uvit-jax.tgz
  if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # What git would commit: tracked (minus deleted) and untracked-but-not-ignored files; never .venv or runs/.
    git -C "$ROOT" ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do if [ -e "$ROOT/$f" ]; then printf '%s\0' "$f"; fi; done |
      tar -C "$ROOT" --null -T - -czf "$TARBALL"
  else
    tar -C "$ROOT" --exclude=.git --exclude=.venv --exclude=runs -czf "$TARBALL" .
  fi
  echo "code: $(tar -tzf "$TARBALL" | wc -l) files from $ROOT ($(du -k "$TARBALL" | cut -f1) KiB)"
  run gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU:uvit-jax.tgz" --zone="$ZONE" --worker=all
  fetch="mkdir -p \"$REMOTE_DIR\" && tar -xzf \"\$HOME/uvit-jax.tgz\" -C \"$REMOTE_DIR\" && rm -f \"\$HOME/uvit-jax.tgz\""
else
  # Files of an earlier launch that REF lacks stay; nothing in the directory is deleted (a relative WORKDIR may live there).
  fetch="mkdir -p \"$REMOTE_DIR\" && cd \"$REMOTE_DIR\" && git init -q . && { git remote remove origin 2>/dev/null || true; } && git remote add origin $(q "$GIT_URL") && git fetch -q --depth=1 origin $(q "$GIT_REF") && git checkout -q --force FETCH_HEAD && git log -1 --format='code: %H %s'"
fi
remote all "set -eu
$fetch
cd \"$REMOTE_DIR\"
command -v uv >/dev/null || [ -x \"\$HOME/.local/bin/uv\" ] || python3 -m pip install -q --user uv
UV=\$(command -v uv || echo \"\$HOME/.local/bin/uv\")
# A venv of another Python (an earlier launch with a different --python) is rebuilt.
.venv/bin/python -c 'import sys; assert sys.version.startswith(\"$PYTHON_VERSION.\")' 2>/dev/null || { rm -rf .venv; \"\$UV\" venv -q --python $(q "$PYTHON_VERSION") .venv; }
\"\$UV\" pip install -q --python .venv/bin/python -r requirements.txt $(q "jax[tpu]==$JAX_VERSION")"

# ---------------------------------------------------------------------------------------------- 4. run
args=(--config "$CONFIG" --workdir "$WORKDIR")
[ -z "$EXPECT" ] || args+=("--config.mesh.expect_devices=$EXPECT")
args+=(${extra[@]+"${extra[@]}"})  # (the empty-array form bash 3.2, macOS's, accepts under set -u)
cmd=".venv/bin/python main.py"
for a in "${args[@]}"; do cmd+=" $(q "$a")"; done
remote all "set -eu
LOGS=\"$REMOTE_LOGS/$STAMP\"
mkdir -p \"\$LOGS\" && ln -sfn $STAMP \"$REMOTE_LOGS/latest\"
# The worker index from the TPU metadata server (hostname if it does not answer).
W=\$(curl -sf -H 'Metadata-Flavor: Google' http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)
cd \"$REMOTE_DIR\"
export UVIT_DISTRIBUTED=1
# Created here, not by the background job's redirection, so the log stream never races the job's start.
: > \"\$LOGS/worker-\$W.log\"
# nohup: the run outlives this ssh session; the wrapper records the exit status for the log stream.
nohup sh -c '\"\$@\"; echo \$? > \"\$0\"' \"\$LOGS/worker-\$W.exit\" $cmd >> \"\$LOGS/worker-\$W.log\" 2>&1 < /dev/null &
echo \$! > \"\$LOGS/worker-\$W.pid\"
echo \"worker \$W: started, log \$LOGS/worker-\$W.log\""

# ---------------------------------------------------------------------------------------------- 5. stream
echo "started on every worker; logs in ~/uvit-jax-logs/$STAMP/worker-<i>.log on worker <i>"
echo "  stream again: bash $ME logs $TPU $ZONE [WORKER]      delete the TPU: bash $ME delete $TPU $ZONE"
[ "$DETACH" = 1 ] || remote 0 "$(stream_script "$STAMP")"
