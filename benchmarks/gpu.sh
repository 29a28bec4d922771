#!/usr/bin/env bash
# GPU benchmark (issue 6 d): ViT-L model-only tiles/s at 512 and 1024 in bf16 and fp32,
# achieved TFLOP/s, the top CUDA kernels, end-to-end Mpx/s on a 16k² synthetic scene, and GPU
# memory. Under 5 minutes on one H100/H200. Writes its JSON to $OUT when set.
#
#   bash benchmarks/gpu.sh                 # on a machine with a GPU
#   bash benchmarks/gpu.sh --cpu-smoke     # dry run on the CPU (tiny model), used by the tests
#
# Wheels the GPU image lacks (rasterio and friends) can travel in .whl/ (see docs/performance.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import rasterio" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/crossearth-site .whl/*.whl
  export PYTHONPATH="/tmp/crossearth-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out_dir=${OUT:-${TMPDIR:-/tmp}}
mkdir -p "$out_dir"
exec "$PY" benchmarks/bench_gpu.py --json "$out_dir/gpu.json" "$@"
