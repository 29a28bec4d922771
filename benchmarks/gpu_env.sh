# Sourced by the GPU scripts (gpu.sh, gpu_session.sh), from the checkout's root: the Python to
# use ($PY), the wheels in .whl/ installed when that Python lacks rasterio (the lent GPU image
# does; `bash benchmarks/gpu_wheels.sh` fetches them here), the checkout on PYTHONPATH, and the
# folder for the JSON reports ($out_dir: $OUT when set).
PY=${PYTHON:-python3}
if ! "$PY" -c "import rasterio" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/crossearth-site .whl/*.whl
  export PYTHONPATH="/tmp/crossearth-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out_dir=${OUT:-${TMPDIR:-/tmp}}
mkdir -p "$out_dir"
