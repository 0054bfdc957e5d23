#!/usr/bin/env bash
# Issue 31's train-step set on one GPU within 8 minutes, compile times included (TOTAL=470 s for the parts).
#
#   bash benchmarks/gpu_issue31.sh                          # every default part; JSON, logs and traces to $OUT
#   bash benchmarks/gpu_issue31.sh ensemdiff_bf16 flags     # only these parts
#   SIZE=tiny bash benchmarks/gpu_issue31.sh                # the same parts at tiny size: a dry run on a CPU
#   FLAG_SETS='--xla_gpu_enable_triton_gemm=false' bash benchmarks/gpu_issue31.sh flags
#
# Each part is one benchmarks/models.py process (one process keeps XLA's convolution autotuning results for the
# rows after the first), timing the published train steps (E2, published loss, AdamW) of today's forms beside
# issue 31's candidates, model options with the same parameters (docs/performance.md, "Train step on the GPU
# (issue 31)"): gnstats (model.norm_impl='stats_float32'), dpa (model.attention_impl='dot_product'), cudnn
# ('cudnn'), remat_conv / remat_dots (model.remat=True with remat_policy 'conv_outputs' / 'dots'); entry@N is
# that row's batch. Every timed row prints images/s, the step's TFLOP/s (XLA's FLOPs without remat's
# recomputation) and its percentage of the device's dense peak (H100 SXM / H200: bf16 989, TF32 495), then the
# top device ops of a jax.profiler trace of 3 more steps. Rows run in the order given, most telling first: a
# part's time limit loses only the rows after it, and the summary names them. A published step compiles in
# 51-107 s on the H200 (2026-11-28), so a part of 210 s reaches about three or four rows.
# XLA flags are read once per process: the flags part runs one row per flag set, each a process of its own,
# in what time is left (a flag this jaxlib does not know is reported and skipped, not fatal).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmark_results}"
mkdir -p "$OUT"
START=$(date +%s)
TOTAL="${TOTAL:-470}"  # seconds for the parts together, leaving the 8-minute window room to start and report
if ls .whl/*.whl >/dev/null 2>&1; then
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl 2>"$OUT/wheels.err"; then
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
  else
    echo "the wheels in .whl/ do not install here ($(tail -n 1 "$OUT/wheels.err")); using the installed packages"
  fi
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
# Issue 31, item 3: whether this machine has PyTorch (for the official code's step beside ours).
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>/dev/null \
  || echo "torch: not installed"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"

SIZE="${SIZE:-published}"
REPEATS="${REPEATS:-10}"
left() { echo $((TOTAL - ($(date +%s) - START))); }

run() {  # run <limit seconds> <name> <models.py arguments...>: within the limit and what is left of TOTAL
  local limit=$1 name=$2; shift 2
  local rest; rest=$(left)
  [ "$rest" -lt "$limit" ] && limit=$rest
  if [ "$limit" -lt 30 ]; then echo "=== $name skipped: ${rest}s left of TOTAL=${TOTAL}s" | tee "$OUT/$name.log"; return; fi
  echo "=== $name (limit ${limit}s, $(left)s left)"
  timeout "$limit" python3 benchmarks/models.py --sizes "$SIZE" --time-published --repeats "$REPEATS" \
    --profile "$OUT/profile/$name" --json "$OUT/$name.json" "$@" 2>&1 \
    | grep --line-buffered -v -E "Warning|warn\(|cuda_timer" | tee "$OUT/$name.log"
  if [ "${PIPESTATUS[0]}" = 124 ]; then echo "=== $name stopped at its ${limit}s limit" | tee -a "$OUT/$name.log"; fi
}

# Most telling first. EnsemDiff in bf16: today's step, the GroupNorm form alone, then the batch sweep with it
# (remat keeping the convolution outputs makes room for 32), then the attention form and the other policy.
ENSEMDIFF_BF16="${ENSEMDIFF_BF16:-ensemdiff+bfloat16@8,ensemdiff+bfloat16+gnstats@8,ensemdiff+bfloat16+gnstats@16,ensemdiff+bfloat16+gnstats+remat_conv@32,ensemdiff+bfloat16+gnstats+dpa@8,ensemdiff+bfloat16+gnstats+remat_dots@16}"
MEDSEGDIFF_BF16="${MEDSEGDIFF_BF16:-medsegdiff+bfloat16@8,medsegdiff+bfloat16+gnstats+dpa@8,medsegdiff+bfloat16+gnstats@16}"
ENSEMDIFF_FP32="${ENSEMDIFF_FP32:-ensemdiff@8,ensemdiff+gnstats+dpa@8}"
# SegDiff's heads (64 and 128 channels) fit cuDNN's fused attention; its step compiles in 89-107 s: not default.
SEGDIFF_BF16="${SEGDIFF_BF16:-segdiff+bfloat16@8,segdiff+bfloat16+gnstats+cudnn@8}"
FLAGS_ROW="${FLAGS_ROW:-ensemdiff+bfloat16+gnstats@8}"
# Flag sets for the flags part, ';'-separated, each timed on FLAGS_ROW. Command buffers (CUDA graphs) including
# cuDNN's convolutions pay where the profile shows the device idle between ops; cuBLAS instead of Triton for
# the few matmuls (attention, the time embedding) where those rank high.
FLAG_SETS="${FLAG_SETS:---xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUDNN,CUSTOM_CALL;--xla_gpu_enable_triton_gemm=false}"

PARTS="${*:-ensemdiff_bf16 medsegdiff_bf16 ensemdiff_fp32 flags}"
for part in $PARTS; do
  case $part in
    ensemdiff_bf16) run 210 ensemdiff_bf16 --models "$ENSEMDIFF_BF16" ;;
    medsegdiff_bf16) run 110 medsegdiff_bf16 --models "$MEDSEGDIFF_BF16" ;;
    ensemdiff_fp32) run 80 ensemdiff_fp32 --models "$ENSEMDIFF_FP32" ;;
    segdiff_bf16) run 200 segdiff_bf16 --models "$SEGDIFF_BF16" ;;
    flags)
      i=0
      IFS=';' read -ra sets <<<"$FLAG_SETS"
      for flags in "${sets[@]}"; do
        i=$((i + 1))
        if [ "$(left)" -lt 40 ]; then  # the flag check below starts a process too: stop before it
          echo "=== flags_$i skipped ('$flags'): $(left)s left of TOTAL=${TOTAL}s" | tee "$OUT/flags_$i.log"
          continue
        fi
        if ! XLA_FLAGS="${XLA_FLAGS:-} $flags" python3 -c "import jax; jax.devices()" 2>"$OUT/flags_$i.err"; then
          echo "=== flags_$i: this jaxlib refuses XLA_FLAGS='$flags': $(grep -o 'Unknown flag.*' "$OUT/flags_$i.err" | head -n 1)" \
            | tee "$OUT/flags_$i.log"
          continue
        fi
        echo "=== flags_$i: XLA_FLAGS='$flags'" | tee "$OUT/flags_$i.flags"
        XLA_FLAGS="${XLA_FLAGS:-} $flags" run 90 "flags_$i" --models "$FLAGS_ROW"
      done
      ;;
    *) echo "unknown part $part" ;;
  esac
done
echo "=== parts done in $(($(date +%s) - START)) s"
python3 benchmarks/summary.py "$OUT"
