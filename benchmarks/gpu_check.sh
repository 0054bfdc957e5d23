#!/usr/bin/env bash
# The benchmark set on one GPU within 8 minutes (the parts' limits add up to 475 s), summary table last.
#
#   bash benchmarks/gpu_check.sh                      # everything; JSON and logs go to $OUT (or ./benchmark_results)
#   bash benchmarks/gpu_check.sh sampling_tiny curves # only these parts
#   TRAIN_MODELS=segformer,segformer+dwconv TRAIN_LIMIT=300 bash benchmarks/gpu_check.sh train
#   SIZE=tiny bash benchmarks/gpu_check.sh            # the same parts at tiny size: checks the script on a CPU
#                                                     # (3 min on 2 cores; sampling_tiny hits its GPU-sized limit)
#
# XLA compiles a published UNet's train step in 33-107 s on an H200 (convolution autotuning; 2026-11-28:
# nnU-Net 33 s, EnsemDiff 51 s with remat and 71 s in bf16, MedSegDiff 74 s, SegDiff 89-107 s; SegFormer-B3
# was still compiling after 165 s, and took 119 s with XLA_FLAGS=--xla_gpu_autotune_level=0), so the train
# part may not reach all seven rows within its limit: it times them in TRAIN_MODELS' order and the summary
# names those it did not reach (run them with TRAIN_MODELS=...). The rows are compiled one at a time: seven
# compiled at once in threads had one row ready after 420 s on the H200. The states start from host-made
# weights (benchmarks/common.py host_variables): the model's own initialisation took another 34 s to compile
# there and is not what is timed. The parts run under their own time limits and write JSON row by row: a
# limit loses only what was not done.
# Where the machine lacks a dependency, put wheels in .whl/ (bash benchmarks/gpu_wheels.sh makes those the
# H200 image lacks); they go to /tmp/site.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmark_results}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl 2>"$OUT/wheels.err"; then
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
  else  # e.g. wheels built for another Python: go on with what is installed
    echo "the wheels in .whl/ do not install here ($(tail -n 1 "$OUT/wheels.err")); using the installed packages"
  fi
fi
# SegDiff's batch-8 step takes a 69.3 GiB buffer, which JAX's default cap (75 % of the GPU) did not leave
# beside the autotuner's scratch on the H200; 95 % did.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"

run() {  # run <seconds> <name> <command...>
  local limit=$1 name=$2; shift 2
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" --json "$OUT/$name.json" 2>&1 | grep -v -E "Warning|warn\(|cuda_timer" | tee "$OUT/$name.log"
  if [ "${PIPESTATUS[0]}" = 124 ]; then echo "=== $name stopped at its ${limit}s limit" | tee -a "$OUT/$name.log"; fi
}

# One row per architecture, then EnsemDiff in bf16 and with remat (their speed and XLA's memory figure
# against float32's).
TRAIN_MODELS="${TRAIN_MODELS:-ensemdiff,segdiff,medsegdiff,nnunet,segformer,ensemdiff+bfloat16,ensemdiff+remat}"
# sampling_paper (issue 31) replaces sampling_published (2 images × 5 members, far too small a batch to fill the
# device) in the default set; sampling_published still runs by name.
PARTS="${*:-sampling_tiny curves train sampling_paper}"
SIZE="${SIZE:-published}"  # tiny: a dry run of every part (the limits stay), before spending device time
for part in $PARTS; do
  case $part in
    sampling_tiny) run 45 sampling_tiny python3 benchmarks/sampling.py --models ensemdiff --size tiny --images 4 --members 5 --steps 50 --repeats 2 ;;
    curves) run 40 curves python3 benchmarks/curves.py --models ensemdiff --size tiny --images 4 --timesteps 100 --repeats 2 ;;
    train) run "${TRAIN_LIMIT:-270}" train python3 benchmarks/models.py --models "$TRAIN_MODELS" --sizes "$SIZE" --time-published --batch 8 --repeats 10 ;;
    # Seconds per segmented image at the paper's settings (ISIC 379 × 10 members, MoNuSeg 14 × 4 tiles × 25; DDPM-1000
    # and DDIM-50; fp32 and bf16), extrapolated from 10 timed steps at the batch eval.batch_size=0 picks. Each row
    # compiles the published UNet's sampler (and the first of each set and dtype once more for the memory
    # analysis): 120 s reach ISIC's first rows; SAMPLING_PAPER_LIMIT=550 bash benchmarks/gpu_check.sh
    # sampling_paper runs all eight.
    sampling_paper) run "${SAMPLING_PAPER_LIMIT:-120}" sampling_paper python3 benchmarks/sampling.py --published --models ensemdiff --size "$SIZE" --repeats 1 ;;
    sampling_published) run 120 sampling_published python3 benchmarks/sampling.py --models ensemdiff --size "$SIZE" --images 2 --members 5 --steps 20 --repeats 2 ;;
    *) echo "unknown part $part" ;;
  esac
done
python3 benchmarks/summary.py "$OUT"
