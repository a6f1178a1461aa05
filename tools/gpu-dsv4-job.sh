#!/usr/bin/env bash
# The DeepSeek-V4 GPU job, run ON the GPU machine from the project root (one device call), with
# .whl (tools/fetch-device-wheels.sh) and .releases/device (tools/pack-release-for-device.py VERSION)
# carried. For the release VERSION, the named steps in order, all within SECONDS in total (each step is
# stopped at the deadline; a failing step does not end the job); logs and JSON under $OUT.
#   bash tools/gpu-dsv4-job.sh VERSION SECONDS STEP...
# STEP: compress-parity, sparse-parity (the patches' @gpu parity tests), compress-bench, prefill-bench,
# sparse-bench (the patch benchmarks), compress-sweep / c128-sweep / prefill-sweep (the compressor kernel's launch rules: decode, all shapes / ratio 128; prefill). The compressor benchmark's per-step column counts DeepSeek-V4-Flash's layers:
# compress_ratios = [0, 0, (4, 128) x 20, 4, 0 (the MTP layer)], so 21 ratio-4 and 20 ratio-128 layers.
set -u
if [ $# -lt 3 ]; then
  echo "usage: bash tools/gpu-dsv4-job.sh VERSION SECONDS STEP..." >&2
  exit 2
fi
VERSION=$1
DEADLINE=$(($(date +%s) + $2))
shift 2
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
source tools/device-setup.sh
set +e +o pipefail  # device-setup.sh sets -e: a failing step must not end the job
python3 -c "import zipfile; zipfile.ZipFile('.releases/device/sglang-$VERSION.zip').extractall('/tmp/r$VERSION')"
export PYTHONPATH=/tmp/r$VERSION:$PWD/test:$PYTHONPATH
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import sglang.version as v; print('sglang', v.__version__)" 2>&1 | tee -a "$OUT/device.txt"
step() {  # name, command...
  local name=$1 left=$((DEADLINE - $(date +%s)))
  shift
  if [ "$left" -le 20 ]; then
    echo "$name: not run (no time left)" | tee "$OUT/$name.log"
    return
  fi
  timeout -k 5 "$((left - 10))" "$@" > "$OUT/$name.log" 2>&1
  echo "rc=$?" >> "$OUT/$name.log"
  echo "== $name"; tail -n 6 "$OUT/$name.log"
}
for name in "$@"; do
  case $name in
    compress-parity) step "$name" python3 -m pytest -q -p no:cacheprovider -m gpu -s test/test_dsv4_fused_compress_patch.py ;;
    sparse-parity) step "$name" python3 -m pytest -q -p no:cacheprovider -m gpu -s test/test_dsv4_sparse_decode_patch.py ;;
    compress-bench) step "$name" python3 benchmark/gpu/bench_dsv4_fused_compress_patch.py --batches 1,4,16,64,128,256 \
      --c4-layers 21 --c128-layers 20 --json "$OUT/dsv4_fused_compress_patch.json" ;;
    prefill-bench) step "$name" python3 benchmark/gpu/bench_dsv4_fused_compress_prefill.py \
      --json "$OUT/dsv4_fused_compress_prefill.json" ;;
    compress-sweep) step "$name" python3 benchmark/gpu/sweep_dsv4_compress_rule.py --json "$OUT/dsv4_compress_rule_sweep.json" ;;
    prefill-sweep) step "$name" python3 benchmark/gpu/sweep_dsv4_compress_rule.py --prefill \
      --json "$OUT/dsv4_compress_rule_sweep.prefill.json" ;;
    c128-sweep) step "$name" python3 benchmark/gpu/sweep_dsv4_compress_rule.py --layers "c128 attention" \
      --json "$OUT/dsv4_compress_rule_sweep.c128.json" ;;
    sparse-bench) step "$name" python3 benchmark/gpu/bench_dsv4_sparse_decode_patch.py --json "$OUT/dsv4_sparse_decode_patch.json" ;;
    *) echo "unknown step: $name" >&2 ;;
  esac
done
