# mipnet_kernels — the two commands a new user runs:
#   make bench   set everything up (venv, torch, build) and run the benchmark suite
#   make test    set everything up and run the test suite (what CI runs, via .ci/run)
# and, on a GPU machine (no internet there: uses the preinstalled python3 and torch):
#   make gpu-smoke   one GPU window (<= 7 min on an H100): build sm_90, selftest, focused
#                    CUDA tests, compute-sanitizer memcheck/racecheck, headline benchmarks
#   make gpu-check   build CUDA, run all tests on CUDA, compute-sanitizer, benchmarks,
#                    raw results into benchmarks/results/<gpu-name>/
#   make bench-check     run the benchmarks, gate them against the committed baseline of this GPU kind
#   make bench-baseline  run the benchmarks, fold them into this GPU kind's baseline.json (commit it)
#   make bench-report    result JSON -> benchmarks/report.md + PNG plots in benchmarks/report/
#   make profile         Chrome trace of MIPNet-W32 N=2 inference + top kernels by time
# (on the GPU box add USE_VENV=0 PYTHON=python3 to the bench-* / profile targets)
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TRITON_VERSION ?= 3.9.0
# USE_VENV=0 uses $(PYTHON) and whatever torch it has instead of a project venv.
USE_VENV ?= 1
ifeq ($(USE_VENV),1)
PY := $(VENV)/bin/python
else
PY := $(PYTHON)
endif
PYTEST_ARGS ?=
# pytest-xdist workers for `make test` (2: the CI machine's cores; 17 -> 8.5 min there)
TEST_JOBS ?= 2
BENCH_JSON ?= benchmarks/out/results.json

CSRC := $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: help setup build test test-fast bench cuda-compile-check gpu-check gpu-build gpu-test gpu-bench \
	sanitize info clean gpu-smoke selftest gpu-resources gpu-resources-check triton-compile-gate \
	bench-check bench-baseline bench-report profile demo

help:
	@sed -n "1,13p" Makefile

# ---------------------------------------------------------------- set-up
$(VENV)/.stamp-deps: pyproject.toml
	@if [ "$(USE_VENV)" = "1" ]; then \
	  test -x $(PY) || $(PYTHON) -m venv $(VENV); \
	  $(PY) -m pip install -q --upgrade pip setuptools wheel 2>&1 | grep -v "is ignored" || true; \
	  $(PY) -m pip install -q torch==$(TORCH_VERSION) triton==$(TRITON_VERSION) \
	    numpy pybind11 ninja pytest pytest-benchmark pytest-xdist hypothesis pycocotools opencv-python-headless scipy \
	    matplotlib tqdm pyyaml pillow \
	    2>&1 | grep -v "is ignored" || true; \
	  $(PY) -c "import torch, triton, pytest_benchmark, xdist" ; \
	else mkdir -p $(VENV); fi
	@touch $@

setup: $(VENV)/.stamp-deps build

# Rebuilt when a C++/CUDA source or setup.py changes (ninja makes it incremental).
$(VENV)/.stamp-build: $(VENV)/.stamp-deps setup.py $(CSRC)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v "is ignored" || true
	$(PY) -c "from mipnet_kernels import _extension as e; ok, why = e.cpu_extension(); assert ok, why"
	@touch $@

build: $(VENV)/.stamp-build

info: setup
	$(PY) -m mipnet_kernels.info

# Registers / spills / shared memory of every Triton and CUDA kernel for sm_90 (no GPU needed)
# -> benchmarks/gpu_resources.md + .json (commit them); -check: exit 1 when a hot kernel
# gained spills; triton-compile-gate: every Triton specialisation compiles for sm_90 + sm_80.
gpu-resources: setup
	env -u TRITON_INTERPRET $(PY) -m benchmarks.gpu_resources
gpu-resources-check: setup
	env -u TRITON_INTERPRET $(PY) -m benchmarks.gpu_resources --check
triton-compile-gate: setup
	env -u TRITON_INTERPRET $(PY) -m benchmarks.gpu_resources --gate

# Every op on every usable backend against the reference (SELFTEST_ARGS e.g. --quick --json F)
SELFTEST_ARGS ?=
selftest: setup
	$(PY) -m mipnet_kernels.selftest $(SELFTEST_ARGS)

# ---------------------------------------------------------------- tests
# Triton kernels run on CPU under the interpreter when there is no GPU (tests/conftest.py).
test: setup
	$(PY) -m pytest tests -q -n $(TEST_JOBS) --durations=15 $(PYTEST_ARGS)
	$(PY) -m pytest benchmarks -q --benchmark-disable $(PYTEST_ARGS)

# Compile every .cu with nvcc (no GPU needed): the CI gate for CUDA code.
cuda-compile-check: setup
	cmake -S . -B build-cuda-check -DMIPNET_CUDA_COMPILE_ONLY=ON \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
	  -DPython3_EXECUTABLE="$$($(PY) -c 'import sys; print(sys.executable)')" > /dev/null
	cmake --build build-cuda-check -j2

# ---------------------------------------------------------------- benchmarks
# The suite, then the headline (benchmarks/headline.py): HRNet-W32 256x192, HRNet vs MIPNet N=2
# (official and ours), inference and training step, ending with its summary table (run even
# when the suite fails; make fails when either does).  HEADLINE_ARGS e.g. --threads 1, --batches 4.
HEADLINE_ARGS ?=
bench: setup
	@mkdir -p $(dir $(BENCH_JSON))
	@status=0; set -x; \
	$(PY) -m pytest benchmarks -q --benchmark-json=$(BENCH_JSON) $(PYTEST_ARGS) || status=$$?; \
	$(PY) -m benchmarks.headline --json $(dir $(BENCH_JSON))headline.json $(HEADLINE_ARGS) || status=1; \
	exit $$status

# Regression gate (benchmarks/gate.py): exit 1 on a regression, 2 when this device kind has no
# committed baseline.  BASELINE=FILE|DIR overrides the baseline; GATE_ARGS e.g. --allow-missing.
# With USE_VENV=0 these use $(PYTHON) as it is (no venv, no build), like gpu-check.
BENCH_SETUP := $(if $(filter 1,$(USE_VENV)),setup)
CHECK_JSON ?= benchmarks/out/bench-check.json
BASELINE ?=
GATE_ARGS ?=
bench-check: $(BENCH_SETUP)
	@mkdir -p benchmarks/out
	$(PY) -m pytest benchmarks -q --benchmark-json=$(CHECK_JSON) $(PYTEST_ARGS)
	$(PY) -m benchmarks.gate $(CHECK_JSON) --markdown benchmarks/out/gate.md \
	  $(if $(BASELINE),--baseline $(BASELINE)) $(GATE_ARGS)

# bench-baseline: the raw run stays in $(BENCH_JSON) (git-ignored); its summary statistics are
# folded into benchmarks/results/<device-kind>/baseline.json (benchmarks/baseline.py).
bench-baseline: $(BENCH_SETUP)
	@mkdir -p benchmarks/out
	$(PY) -m pytest benchmarks -q --benchmark-json=$(BENCH_JSON) $(PYTEST_ARGS)
	$(PY) -m benchmarks.baseline update $(BENCH_JSON)

# REPORT_INPUT: JSON file(s) or results folder(s) of one device kind (default: the results
# folder of this machine's kind, its baseline.json and any raw runs there; CI passes
# REPORT_INPUT=$(CHECK_JSON)).
REPORT_INPUT ?=
bench-report:
	$(PY) -m benchmarks.report --markdown benchmarks/report.md --plots benchmarks/report \
	  $(or $(REPORT_INPUT),benchmarks/results/$$($(PY) -c 'from benchmarks import _report; print(_report.current_device_slug())'))

# PROFILE_ARGS e.g. --batch 48 --dtype bfloat16 (see python -m benchmarks.profile_model -h)
PROFILE_ARGS ?=
profile:
	$(PY) -m benchmarks.profile_model --out benchmarks/out/profile $(PROFILE_ARGS)

# ---------------------------------------------------------------- synthetic crowd demo
# Baseline vs MIPNet on the embedded synthetic crowd (CPU: under 10 minutes): AP by occlusion and
# with fewer boxes (keep_0.75, keep_0.5, occluded_dropped) with 95% bootstrap intervals, demo_boxes.png.
# DEMO_ARGS e.g. --seed 1, --full (HRNet-W32 256x192 on a GPU) or --threads 2.
DEMO_OUT ?= demo_out
DEMO_ARGS ?=
demo: setup
	$(PY) -m mipnet demo --out $(DEMO_OUT) $(DEMO_ARGS)

# ---------------------------------------------------------------- GPU machine
# One GPU window (<= 7 min on an H100): build sm_90, selftest, focused CUDA tests,
# compute-sanitizer memcheck/racecheck, headline benchmarks; JSON in $OUT and
# benchmarks/results/<gpu>/smoke-<time>/.  Call with USE_VENV=0 PYTHON=python3 on the GPU box.
# GPU_SMOKE_ARGS e.g. --skip-build, --only tests,bench, --dry-run, --collect
GPU_SMOKE_ARGS ?=
gpu-smoke:
	$(PY) benchmarks/gpu_smoke.py $(GPU_SMOKE_ARGS)

GPU_LOG ?= benchmarks/out/gpu-check.log
# Every step runs even when an earlier one fails (a GPU session is scarce); the exit status
# says whether all passed.  Each step is also a target of its own, short enough for one
# 10-minute device call: gpu-build, gpu-test, sanitize, gpu-bench.
GPU_STEPS ?= gpu-build gpu-test sanitize gpu-bench
gpu-check:
	@status=0; for step in $(GPU_STEPS); do \
	  echo "=== make $$step"; $(MAKE) --no-print-directory USE_VENV=0 $$step || { echo "=== $$step FAILED"; status=1; }; \
	done; exit $$status

gpu-build:
	@mkdir -p benchmarks/out
	set -o pipefail; MIPNET_KERNELS_FORCE_CUDA=1 $(PYTHON) -m pip install --no-build-isolation --no-deps --no-index -e . 2>&1 | tee benchmarks/out/build.log | tail -3
	$(PYTHON) -m mipnet_kernels.info
	$(PYTHON) -c "import mipnet_kernels as mk; b = mk.available_backends(); assert all(b[n]['available'] for n in ('cuda', 'triton', 'cpu')), b"

gpu-test:
	$(PYTHON) -m pytest tests -q -rs $(PYTEST_ARGS)

gpu-bench:
	@mkdir -p $(dir $(BENCH_JSON))
	$(PYTHON) -m pytest benchmarks -q --benchmark-json=$(BENCH_JSON) --mipnet-results-dir=benchmarks/results $(PYTEST_ARGS)

# compute-sanitizer (memcheck, racecheck, initcheck, synccheck) over the tests of the CUDA
# backend's kernels (test ids "cuda-cuda-...": backend cuda on CUDA tensors).
SANITIZE_TESTS ?= tests/test_decode.py tests/test_flip_merge.py tests/test_mimb.py tests/test_mimb_cuda.py \
	tests/test_nms.py tests/test_nms_kernels.py
SANITIZE_K ?= cuda-cuda and not compile
sanitize:
	for tool in memcheck racecheck initcheck synccheck; do \
	  compute-sanitizer --tool $$tool --error-exitcode 1 \
	    $(PY) -m pytest $(SANITIZE_TESTS) -q -x -m cuda -k "$(SANITIZE_K)" || exit 1; \
	done

clean:
	rm -rf build build-* *.egg-info mipnet_kernels/*.so $(VENV)/.stamp-build
