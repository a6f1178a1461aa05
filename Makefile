# make test   the test suite (CPU: engine, parity on 0.5.11 and, one process each, 0.5.12.post1,
#             0.5.13.post1 and 0.5.23; every release's status; kernels under the Triton interpreter)
# make lint   ruff with the rules in pyproject.toml (CI runs it before the tests)
# make bench  every decode and kernel benchmark, one table (quick shapes on the CPU)
# make wheel  dist/sglang_hip_decode-*-py3-none-any.whl: both packages, pure Python, for an offline GPU host
#             (pip install --no-deps --no-index dist/sglang_hip_decode-*.whl; it never touches torch); built
#             in .venv-build (setuptools + wheel only, fetched once), not the test environment
# The others create .venv on first use with the pinned environment (requirements/cpu.txt).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SGLANG_WHEEL_DIR ?= .whl

.PHONY: test test-gpu lint bench venv clean-venv device-wheels releases wheel

venv: $(STAMP)

$(STAMP): requirements/cpu.txt requirements/lint.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.11.0 torchvision==0.26.0
	$(PY) -m pip download -q --disable-pip-version-check --no-deps sglang==0.5.11 -d $(SGLANG_WHEEL_DIR)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(SGLANG_WHEEL_DIR)/sglang-0.5.11-*.whl
	@echo "note: sglang is installed --no-deps, so pip's 'sglang ... requires X, which is not installed' lines below are expected"
	$(PY) -m pip install -q --disable-pip-version-check -r requirements/cpu.txt -r requirements/lint.txt
	$(PY) -m pip install -q --disable-pip-version-check wheel==0.45.1
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Test files run on up to 4 workers (one file stays on one worker: its module fixtures run once).
PYTEST_WORKERS ?= -n auto --maxprocesses 4 --dist loadfile

# Every verified release's wheel (.releases/wheels, ~280 MB) and the parity releases installed one per
# folder (.releases/<version>); test_releases.py reads them, and fails rather than skips under make test.
releases: $(STAMP)
	$(PY) tools/release_wheels.py

test: $(STAMP) releases
	SGLANG_HIP_DECODE_TEST_RELEASES=1 $(PY) -m pytest -q -ra $(PYTEST_WORKERS)

test-gpu: $(STAMP)
	$(PY) -m pytest -q -ra -m gpu

lint: $(STAMP)
	$(PY) -m ruff check .

# Built from a copy of the sources, so the checkout gets no build/ or egg-info from it.
BUILD_VENV ?= .venv-build
wheel:
	test -x $(BUILD_VENV)/bin/python || $(PYTHON) -m venv $(BUILD_VENV)
	$(BUILD_VENV)/bin/python -m pip install -q --disable-pip-version-check "setuptools>=64" wheel==0.45.1
	$(BUILD_VENV)/bin/python tools/build_wheel.py dist

bench: $(STAMP)
	$(PY) benchmark/run_all.py $(BENCH_ARGS)

# Wheels that let sglang's modules import on the GPU machine (see tools/device-setup.sh).
device-wheels:
	bash tools/fetch-device-wheels.sh

clean-venv:
	rm -rf $(VENV)
