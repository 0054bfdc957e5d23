#!/usr/bin/env bash
# The benchmark set on one GPU within 8 minutes (the parts' limits add up to 435 s), summary table last.
#
#   bash benchmarks/gpu_check.sh                      # everything; JSON and logs go to $OUT (or ./benchmark_results)
#   bash benchmarks/gpu_check.sh sampling_tiny curves # only these parts
#   TRAIN_MODELS=segformer,nnunet+bfloat16 TRAIN_LIMIT=120 bash benchmarks/gpu_check.sh train
#   SIZE=tiny bash benchmarks/gpu_check.sh            # the same parts at tiny size: checks the script on a CPU
#                                                     # (7 min on 2 cores; the two short parts hit their GPU-sized limits)
#
# XLA compiles each published UNet's train step in about a minute on a GPU (convolution autotuning), and
# SegFormer-B3's in over three: one after another the train rows alone would take the 8 minutes. So the train
# part compiles all its rows at once in threads (models.py --compile-workers) and times them one by one once
# every compilation is done (after 200 s, the ready rows are timed beside the slower compilations, and marked
# so). The parts run under their own time limits and write JSON row by row: a limit loses only what was not
# done.
# Where the machine lacks a dependency, put wheels in .whl/ (README "Performance"); they go to /tmp/site.
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
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"

run() {  # run <seconds> <name> <command...>
  local limit=$1 name=$2; shift 2
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" --json "$OUT/$name.json" 2>&1 | grep -v -E "Warning|warn\(|cuda_timer" | tee "$OUT/$name.log"
  if [ "${PIPESTATUS[0]}" = 124 ]; then echo "=== $name stopped at its ${limit}s limit" | tee -a "$OUT/$name.log"; fi
}

# The slowest compilation first; float32, then EnsemDiff in bf16 and with remat (their memory against float32's).
TRAIN_MODELS="${TRAIN_MODELS:-segformer,ensemdiff,segdiff,medsegdiff,nnunet,ensemdiff+bfloat16,ensemdiff+remat}"
TRAIN_ROWS=$(($(tr -cd , <<<"$TRAIN_MODELS" | wc -c) + 1))
PARTS="${*:-sampling_tiny curves train sampling_published}"
SIZE="${SIZE:-published}"  # tiny: a dry run of every part (the limits stay), before spending device time
for part in $PARTS; do
  case $part in
    sampling_tiny) run 45 sampling_tiny python3 benchmarks/sampling.py --models ensemdiff --size tiny --images 4 --members 5 --steps 50 --repeats 2 ;;
    curves) run 40 curves python3 benchmarks/curves.py --models ensemdiff --size tiny --images 4 --timesteps 100 --repeats 2 ;;
    train) run "${TRAIN_LIMIT:-290}" train python3 benchmarks/models.py --models "$TRAIN_MODELS" --sizes "$SIZE" --time-published --batch 8 --repeats 10 --compile-workers "$TRAIN_ROWS" --compile-deadline 200 ;;
    sampling_published) run 60 sampling_published python3 benchmarks/sampling.py --models ensemdiff --size "$SIZE" --images 2 --members 5 --steps 20 --repeats 2 ;;
    *) echo "unknown part $part" ;;
  esac
done
python3 benchmarks/summary.py "$OUT"
