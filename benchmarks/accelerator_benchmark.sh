#!/usr/bin/env bash
# One-command accelerator benchmark (one GPU, under 10 minutes): train-step speed of U-ViT-S/2, L/2, H/2 at bf16
# for each attention implementation, plus a 500-sample DPM-Solver timing for H/2; one markdown table at the end.
set -euo pipefail
ME="benchmarks/accelerator_benchmark.sh"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<EOF
usage: bash $ME OUTDIR

Rows (each a separate process under 'timeout', from the repository root):
  python main.py --mode benchmark --config CONFIG --workdir OUTDIR/<model>-<attention> --config.dtype=bfloat16
      --config.attention=ATTENTION --config.train.batch_size=\$BATCH --benchmark_steps=\$STEPS
  for CONFIG in configs/cifar10_uvit_s2.py (S/2), configs/imagenet256_uvit_l2.py (L/2),
  configs/imagenet256_uvit_h2.py (H/2) and each ATTENTION in \$ATTENTIONS; then
  python main.py --mode sample --config configs/imagenet256_uvit_h2.py --workdir OUTDIR/h2-sample500
      --config.sample.random_params=True --config.dtype=bfloat16 --config.sample.n_samples=500 --config.sample.mini_batch_size=500
A failed or timed-out row prints the end of its log and the next row runs. The table (also written to
OUTDIR/results.md) is built from each row's OUTDIR/<row>/benchmark.json; each row's output is in OUTDIR/<row>.log.
The whole run stops starting rows after \$BUDGET_S seconds (later rows are reported as skipped). Exit status 0
only if every row succeeded.

Environment (defaults): ATTENTIONS ("xla cudnn einsum"), BATCH (128, global), STEPS (10), TIMEOUT (120 s per
benchmark row), SAMPLE_TIMEOUT (180 s), BUDGET_S (570), PYTHON (python).
EOF
}

case "${1:-}" in -h|--help) usage; exit 0 ;; esac
if [ $# -ne 1 ] || [ -z "$1" ]; then echo "$ME: error: need OUTDIR" >&2; echo >&2; usage >&2; exit 2; fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
ATTENTIONS=${ATTENTIONS:-xla cudnn einsum}
BATCH=${BATCH:-128}; STEPS=${STEPS:-10}; TIMEOUT=${TIMEOUT:-120}; SAMPLE_TIMEOUT=${SAMPLE_TIMEOUT:-180}
BUDGET_S=${BUDGET_S:-570}
PYTHON=${PYTHON:-python}
cd "$ROOT"
ROWS=$OUT/rows.tsv
: > "$ROWS"
START=$SECONDS
failed=0

# run_row NAME MODEL ATTENTION KIND RESERVE_S CMD...: run CMD with a timeout that also leaves RESERVE_S of the
# budget for later rows; record name, model, attention, kind, status, wall seconds in rows.tsv.
run_row() {
  local name=$1 model=$2 attn=$3 kind=$4 reserve=$5; shift 5
  local left=$((BUDGET_S - (SECONDS - START) - reserve)) limit=$TIMEOUT status rc t0
  [ "$kind" = sample ] && limit=$SAMPLE_TIMEOUT
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  rm -rf "${OUT:?}/$name"  # never report numbers of an earlier run
  if [ "$left" -lt 20 ]; then
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$model" "$attn" "$kind" "skipped (time budget)" 0 >> "$ROWS"
    echo "== $name: skipped (time budget)"; failed=1; return
  fi
  echo "== $name (timeout ${limit}s): $*"
  t0=$SECONDS; rc=0
  timeout --kill-after=15 "$limit" "$@" --workdir "$OUT/$name" > "$OUT/$name.log" 2>&1 || rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timeout after ${limit}s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$model" "$attn" "$kind" "$status" $((SECONDS - t0)) >> "$ROWS"
  if [ "$rc" != 0 ]; then
    failed=1
    echo "== $name: $status; end of $OUT/$name.log:"
    tail -n 15 "$OUT/$name.log" | sed 's/^/   | /'
  fi
}

MODELS=("S/2 configs/cifar10_uvit_s2.py s2" "L/2 configs/imagenet256_uvit_l2.py l2" "H/2 configs/imagenet256_uvit_h2.py h2")
for m in "${MODELS[@]}"; do
  read -r label config key <<< "$m"
  for attn in $ATTENTIONS; do
    run_row "$key-$attn" "$label" "$attn" benchmark "$SAMPLE_TIMEOUT" \
      "$PYTHON" main.py --mode benchmark --config "$config" --config.dtype=bfloat16 --config.attention="$attn" \
      --config.train.batch_size="$BATCH" --benchmark_steps="$STEPS"
  done
done
# --config.sample.random_params=True: sample from freshly initialised weights (no checkpoint): the timing does not need trained ones.
run_row h2-sample500 "H/2" auto sample 0 \
  "$PYTHON" main.py --mode sample --config configs/imagenet256_uvit_h2.py --config.sample.random_params=True \
  --config.sample.dtype=bfloat16 --config.sample.n_samples=500 --config.sample.mini_batch_size=500

"$PYTHON" - "$OUT" <<'PY' | tee "$OUT/results.md"
import json, os, re, sys

out = sys.argv[1]


def fmt(v, digits=1):
    return "" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def last_error(log):
    """The most telling line of a failed row's log: the last exception-like line, else the last line."""
    try:
        lines = [l.strip() for l in open(log, errors="replace") if l.strip()]
    except OSError:
        return "no log"
    hits = [l for l in lines if re.search(r"Error|Exception|error:|Killed|FATAL", l)]
    return ((hits or lines or ["empty log"])[-1])[:120].replace("|", "/")


cols = ["model", "attention", "status", "wall s", "compile s", "train img/s", "TFLOP/s/device", "MFU",
        "peak GB", "fwd img/s", "samples/s"]
print("| " + " | ".join(cols) + " |")
print("|" + "---|" * len(cols))
device = None
for line in open(os.path.join(out, "rows.tsv")):
    name, model, attn, kind, status, wall = line.rstrip("\n").split("\t")
    log = os.path.join(out, name + ".log")
    r, samples_per_s = {}, None
    if status == "ok" and kind == "benchmark":
        try:
            r = json.load(open(os.path.join(out, name, "benchmark.json")))
            device = device or r.get("device")
        except (OSError, ValueError) as e:
            status = f"no benchmark.json ({type(e).__name__})"
    if status == "ok" and kind == "sample":
        # sample mode logs "... X samples/s" per batch (one batch of 500 here, so compilation is included);
        # without such a line, 500 / the row's wall time.
        found = re.findall(r"([0-9.]+) samples/s", open(log, errors="replace").read())
        samples_per_s = f"{float(found[-1]):.2f}" if found else f"{500 / max(float(wall), 1):.2f} (500 / wall s)"
    if status.startswith("failed"):
        status += ": " + last_error(log)
    mfu = r.get("mfu")
    print("| " + " | ".join([model, attn, status, wall, fmt(r.get("compile_s")), fmt(r.get("train_images_per_s")),
                             fmt(r.get("train_tflops_per_s_per_device")), "" if mfu is None else f"{100 * mfu:.1f}%",
                             fmt(r.get("peak_device_memory_gb")), fmt(r.get("forward_images_per_s")),
                             samples_per_s or ""]) + " |")
print(f"\ndevice: {device or 'unknown'}; bf16; wall s = the whole command (start-up and compilation included); "
      f"samples/s = 500 DPM-Solver samples in one batch, compilation included; logs and JSON in {out}")
PY
exit "$failed"
