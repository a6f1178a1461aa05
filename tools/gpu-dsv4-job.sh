#!/usr/bin/env bash
# The DeepSeek-V4 GPU job, run ON the GPU machine from the project root (one device call), with
# .whl (tools/fetch-device-wheels.sh) and .releases/device (tools/pack-release-for-device.py VERSION)
# carried. For the release VERSION (default 0.5.23): the @gpu parity tests of both DSV4 patches, then
# both patch benchmarks, each under its own time limit; logs and JSON under $OUT.
#   bash tools/gpu-dsv4-job.sh [VERSION] [SECONDS_PER_STEP]
set -u
VERSION=${1:-0.5.23}
LIMIT=${2:-240}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
source tools/device-setup.sh
set +e +o pipefail  # device-setup.sh sets -e: a failing step must not end the job
python3 -c "import zipfile; zipfile.ZipFile('.releases/device/sglang-$VERSION.zip').extractall('/tmp/r$VERSION')"
export PYTHONPATH=/tmp/r$VERSION:$PWD/test:$PYTHONPATH
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/device.txt"
step() {  # name, command...
  local name=$1; shift
  timeout -k 10 "$LIMIT" "$@" > "$OUT/$name.log" 2>&1
  echo "rc=$?" >> "$OUT/$name.log"
  tail -n 4 "$OUT/$name.log"
}
step compress-parity python3 -m pytest -q -p no:cacheprovider -m gpu -s test/test_dsv4_fused_compress_patch.py
step sparse-parity python3 -m pytest -q -p no:cacheprovider -m gpu -s test/test_dsv4_sparse_decode_patch.py
step compress-bench python3 benchmark/gpu/bench_dsv4_fused_compress_patch.py --json "$OUT/dsv4_fused_compress_patch.json"
step sparse-bench python3 benchmark/gpu/bench_dsv4_sparse_decode_patch.py --json "$OUT/dsv4_sparse_decode_patch.json"
