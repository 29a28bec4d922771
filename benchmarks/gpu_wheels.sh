#!/usr/bin/env bash
# Fetch, on this machine (where the package registry is reachable), the wheels the lent GPU
# image lacks for gpu.sh and gpu_session.sh into .whl/ (git-ignored; ~40 MB, inside the device
# tool's 64 MiB carry limit). The image has torch, timm, numpy, click, safetensors and
# huggingface_hub; what `segment` needs beyond them is rasterio and its small pure-Python deps.
#
#   bash benchmarks/gpu_wheels.sh          # for the image's Python 3.12
#   bash benchmarks/gpu_wheels.sh 3.11     # for another Python
#
# Then, in the device run: carry [".whl"], command `bash benchmarks/gpu_session.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
py_version=${1:-3.12}
PY=${PYTHON:-python3}
rm -rf .whl
mkdir .whl
"$PY" -m pip download -q --only-binary=:all: --no-deps --dest .whl \
  --python-version "$py_version" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 \
  rasterio affine cligj click-plugins
du -sh .whl
ls .whl
