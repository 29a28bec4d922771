#!/usr/bin/env bash
# A lent GPU's issue-6 work in one device command (about 8 minutes on an H100/H200):
#   1. gpu_explore.py on the prepared candidates only (the fused Triton kernels of fused_vit.py
#      and fused_head.py with their exactness checks on the GPU, the candidates.py ones,
#      regional compile), against `now` and `before` at 512², and the card's measured matmul
#      rate -> $OUT/explore.json;
#   2. gpu.sh, the issue's figures (model-only, end to end, memory) -> $OUT/gpu.json.
# Each part has its own time budget (EXPLORE_BUDGET, GPU_BUDGET seconds; later steps are
# skipped), so one part running long cannot take the other's time.
#
#   bash benchmarks/gpu_wheels.sh                 # here, first: rasterio for the GPU image
#   bash benchmarks/gpu_session.sh                # there, with carry [".whl"], timeout_s 590
#   bash benchmarks/gpu_session.sh --cpu-smoke    # dry run on the CPU (tiny model), in the tests
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
mode=()
size=512
if [ "${1:-}" = "--cpu-smoke" ]; then
  mode=(--cpu-smoke --quick)
  size=64
fi
only="^model_${size}_(now|before)\$|now_plus|fused|compile|matmul"
status=0
"$PY" benchmarks/gpu_explore.py ${mode[0]+"${mode[0]}"} --seconds 2 \
  --budget "${EXPLORE_BUDGET:-230}" --only "$only" --json "$out_dir/explore.json" || status=$?
PYTHON=$PY bash benchmarks/gpu.sh ${mode[0]+"${mode[@]}"} --budget "${GPU_BUDGET:-200}" \
  || status=$?
exit "$status"
