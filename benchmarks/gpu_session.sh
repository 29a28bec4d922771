#!/usr/bin/env bash
# A lent GPU's issue-6 work in one device command (about 9 minutes on an H100/H200):
#   1. gpu.sh, the issue's figures (model-only, end to end, memory) -> $OUT/gpu.json;
#   2. gpu_explore.py on what is not measured yet -> $OUT/explore.json: CUDA graphs
#      (crossearth_cli/cuda_graphs.py, opt-in until this measures it): model-only at batch 16
#      and 1 with and without, with its bitwise agreement with the eager forward; `segment` on
#      an 8192² scene and a folder of 128 single-tile files, with and without; `now` and
#      `before` at 512², the card's measured matmul rate and the fused kernels' exactness
#      checks; the candidate fused pixel-decoder encoder (fused_pixel.py: its check on the
#      GPU, then the model with it, also with the deformable attention's softmax and points
#      made in its kernel); the decoder's masks from each layer's full-size logits, as before
#      they came from features resized once per level; last, the head alone compiled
#      (candidates.head_compile), then the whole model (now one graph), alone and replayed
#      from CUDA graphs; and SDPA with cuDNN's attention kernels first (CROSSEARTH_SDPA=cudnn).
# Each part has its own time budget (GPU_BUDGET, EXPLORE_BUDGET seconds; later steps are
# skipped, and a compilation is not started when the budget cannot hold it), and the issue's
# figures come first, so the candidates cannot take their time. Both JSON files are rewritten
# after every step: a run cut off by the device's time limit keeps what it measured.
#
#   bash benchmarks/gpu_wheels.sh                 # here, first: rasterio for the GPU image
#   bash benchmarks/gpu_session.sh                # there, with carry [".whl"], timeout_s 590
#   bash benchmarks/gpu_session.sh --cpu-smoke    # dry run on the CPU (tiny model), in the tests
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
only="cuda_graphs|cudnn|now_b(1|64)\$|now_plus_best|folder_of_tiles|end_to_end|fused|masks_resized|matmul|now_compiled"
explore=(--seconds 2 --budget "${EXPLORE_BUDGET:-300}" --json "$out_dir/explore.json")
gpu=(--budget "${GPU_BUDGET:-200}")
if [ "${1:-}" = "--cpu-smoke" ]; then  # the tiny model at 64², its own small scene
  explore+=(--cpu-smoke --only "^model_64_(now|before)\$|$only")
  gpu+=(--cpu-smoke --quick)
else
  explore+=(--e2e-size 8192 --only "^model_512_(now|before)\$|$only")
fi
status=0  # gpu.sh first: the issue's figures must not wait on the candidates
PYTHON=$PY bash benchmarks/gpu.sh "${gpu[@]}" || status=$?
"$PY" benchmarks/gpu_explore.py "${explore[@]}" || status=$?
exit "$status"
