#!/usr/bin/env bash
# GPU benchmark (issue 6 d): ViT-L model-only tiles/s at 512 and 1024 in bf16 and fp32,
# achieved TFLOP/s, the top CUDA kernels, end-to-end Mpx/s on a 16k² synthetic scene, and GPU
# memory. Under 5 minutes on one H100/H200. Writes its JSON to $OUT when set.
#
#   bash benchmarks/gpu.sh                 # on a machine with a GPU
#   bash benchmarks/gpu.sh --cpu-smoke     # dry run on the CPU (tiny model), used by the tests
#
# The GPU image lacks rasterio: `bash benchmarks/gpu_wheels.sh` here, then carry .whl/ (gpu_env.sh
# installs it there). benchmarks/gpu_session.sh runs this after the candidates, in one command.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
exec "$PY" benchmarks/bench_gpu.py --json "$out_dir/gpu.json" "$@"
