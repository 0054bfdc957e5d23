#!/usr/bin/env bash
# The whole benchmark set on one GPU in under 8 minutes; a summary table is printed last.
#
#   bash benchmarks/gpu_check.sh            # writes JSON and logs to $OUT (or ./benchmark_results)
#
# Each benchmark runs under its own time limit, so one slow compile cannot eat the others' time. Where the
# machine lacks a dependency, put wheels in .whl/ (see README "Performance"); they are installed to /tmp/site.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmark_results}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"

run() {  # run <seconds> <name> <command...>
  local limit=$1 name=$2; shift 2
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" --json "$OUT/$name.json" 2>&1 | grep -v -E "Warning|warn\(" | tee "$OUT/$name.log"
}

MODELS=$(python3 -c "from diffseg_jax import models; print(','.join(m for m in sorted(models.MODELS) if m != 'medsegdiff_new'))")
run 200 train_f32 python3 benchmarks/models.py --models "$MODELS" --sizes published --time-published --batch 8 --repeats 10
run 60 train_bf16 python3 benchmarks/models.py --models ensemdiff,segdiff --sizes published --time-published --batch 8 --repeats 10 --dtype bfloat16
run 45 train_remat python3 benchmarks/models.py --models ensemdiff --sizes published --time-published --batch 8 --repeats 10 --remat
run 60 sampling_published python3 benchmarks/sampling.py --models ensemdiff,segdiff --size published --images 2 --members 5 --steps 50 --repeats 2
run 30 sampling_tiny python3 benchmarks/sampling.py --models ensemdiff --size tiny --images 4 --members 10 --steps 100 --repeats 3
run 45 curves python3 benchmarks/curves.py --models ensemdiff --size published --images 4 --timesteps 1000 --t-step 10 --t-chunk 10 --repeats 2
python3 benchmarks/summary.py "$OUT"
