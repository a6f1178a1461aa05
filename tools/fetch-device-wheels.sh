#!/usr/bin/env bash
# Run HERE (the development machine), from the project root: downloads into .whl/ the wheels that let
# sglang 0.5.11's Python modules import on the GPU machine, which has torch 2.11.0+cu130 and triton
# 3.6.0 (the versions sglang 0.5.11 pins) but no network. About 40 MB; .whl/ is git-ignored and
# travels with a device call as `carry: [".whl"]`. Then run tools/device-setup.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -v -e '^sglang==' -e '^#' tools/device-wheels.txt | xargs python3 -m pip download -q --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp \
  --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl
# sglang's wheel is tagged cp311 (one unused grpc .so); device-setup.sh unpacks it instead of installing it.
python3 -m pip download -q --no-deps sglang==0.5.11 -d .whl
du -sh .whl
