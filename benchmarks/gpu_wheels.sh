#!/usr/bin/env bash
# The packages diffseg_jax needs that a GPU machine's image lacks, as wheels in .whl/ for gpu_check.sh.
#
#   bash benchmarks/gpu_wheels.sh            # Python 3.12 (the H200 image's), manylinux x86-64
#   PY=3.11 bash benchmarks/gpu_wheels.sh    # another Python on the machine
#
# The list is what diffseg_jax and the benchmarks import beyond the H200 image's own packages (jax, flax,
# optax, orbax-checkpoint, numpy, matplotlib, absl, ... are there; 2026-11-28), at the versions pip resolves
# here. promise has no wheel on PyPI: it is built from its source (pure Python). Each call of the device
# machine that runs gpu_check.sh carries the folder: run(..., carry=[".whl"]); .git/info/exclude keeps it
# out of commits.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-3.12}"
mkdir -p .whl
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >>.git/info/exclude
version() { python3 -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || true; }
PACKAGES="ml_collections grain array_record tensorflow-datasets tensorflow-metadata immutabledict toml portpicker
dm-tree termcolor simple-parsing docstring-parser googleapis-common-protos"
for p in $PACKAGES; do
  v=$(version "$p")
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$p${v:+==$v}"
done
v=$(version promise)
python3 -m pip wheel -q --no-deps -w .whl "promise${v:+==$v}"
ls .whl
