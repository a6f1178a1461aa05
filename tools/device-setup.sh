#!/usr/bin/env bash
# Run ON the GPU machine, from the project root, with .whl carried (tools/fetch-device-wheels.sh).
# Installs the wheels and this package into /tmp/site and unpacks sglang there. Source it, or run it
# and then `export PYTHONPATH=/tmp/site:$PWD/python:$PWD/sgl-kernel/python`.
#
# sglang 0.5.11 on CUDA imports sgl_kernel (326 MB, cannot travel): the tests and benchmarks import
# sglang's modules with torch.cuda.is_available patched to return False during the import only
# (module flags come out False; CUDA tensors and Triton work afterwards).
set -euo pipefail
mkdir -p /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  $(ls .whl/*.whl | grep -v '/sglang-')
python3 -c "import zipfile,glob; zipfile.ZipFile(glob.glob('.whl/sglang-0.5.11-*.whl')[0]).extractall('/tmp/site')"
export PYTHONPATH=/tmp/site:$PWD/python:$PWD/sgl-kernel/python${PYTHONPATH:+:$PYTHONPATH}
