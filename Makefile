# Set-up and routine commands. Only python3 (3.10+) is needed to start.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test test-long fuzz soak test-gpu gpu-static lint asv-quick bench bench-small bench-gpu bench-sync bench-dask clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-base: pyproject.toml numbabn/__init__.py | $(PY)
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml numbabn/__init__.py | $(PY)
	$(PIP) -e ".[test]"
	touch $@

$(VENV)/.installed-bench: pyproject.toml numbabn/__init__.py | $(PY)
	$(PIP) -e ".[test,bench]"
	touch $@

## demo: normalise a batch, check it against NumPy, run a few train/eval steps
demo: $(VENV)/.installed-base
	$(PY) -m numbabn

## test: lint, run the whole test suite, then every asv benchmark once
test: $(VENV)/.installed-test lint
	$(PY) -m pytest -m "not long"
	$(MAKE) asv-quick

## test-long: the tests that take minutes each (a warm-up of every kernel into an empty cache)
test-long: $(VENV)/.installed-test
	$(PY) -m pytest -m long

## fuzz: the generated cases against PyTorch with fresh random examples, many more of them
fuzz: $(VENV)/.installed-test
	NUMBABN_HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -p no:cacheprovider tests/test_properties.py

## soak: 50,000 mixed calls from several threads; resident memory, threads and files stay flat
soak: $(VENV)/.installed-test
	$(PY) tests/soak_workload.py --calls 50000

# The GPU targets run on the machine's own Python, which must already have numpy,
# numba-cuda and pytest (PyTorch and CuPy for the comparisons): they build no venv,
# so they work offline. Name another interpreter with GPU_PYTHON=..., e.g.
# GPU_PYTHON=.venv/bin/python for the dry run on a machine without a GPU.
GPU_PYTHON ?= python3
GPU_RUN := NUMBA_ENABLE_CUDASIM=0 PYTHONPATH=$(CURDIR) $(GPU_PYTHON)

## test-gpu: the CUDA backend's tests on a real NVIDIA GPU, without the simulator
test-gpu:
	$(GPU_RUN) -m pytest -p no:cacheprovider tests/test_cuda.py tests/test_cuda_arrays.py tests/test_fused.py

## bench-gpu: numbabn on the GPU beside PyTorch's CUDA batch norm and a streaming roofline
bench-gpu:
	$(GPU_RUN) -m tools.bench --device cuda

## gpu-check: every GPU check in one run of under 8 minutes into OUT (log, summary, report,
## JUnit XML); DRY_RUN=1 runs it in the CUDA simulator on tiny shapes; STEPS=a,b picks steps
.PHONY: gpu-check
gpu-check:
	$(if $(OUT),,$(error name the results folder: make gpu-check OUT=dir))
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) -m tools.bench.gpu_check --out $(OUT) \
		$(if $(DRY_RUN),--dry-run) $(if $(STEPS),--steps $(STEPS))

## gpu-static: the CUDA kernels compiled for sm_90 without a GPU (registers, spills, occupancy,
## SASS per element) into benchmarks/results/gpu-static.md
gpu-static: $(VENV)/.installed-test
	NUMBA_ENABLE_CUDASIM=0 $(PY) -m tools.bench.gpu_static --out benchmarks/results/gpu-static.md

## asv-quick: run each asv benchmark once in this environment (fails on a broken one);
## the cold-start ones, which compile everything each time, are left to a full asv run
asv-quick: $(VENV)/.installed-test
	$(VENV)/bin/asv machine --yes > /dev/null
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/asv run --python=same --quick --show-stderr \
		--bench '^(?!bench_startup\.Startup)'


## bench: numbabn beside PyTorch, NumPy and the memory roofline (tables, JSON, PNG)
bench: $(VENV)/.installed-bench
	$(PY) -m tools.bench

## bench-small: small module calls beside torch.nn's and a one-call floor, in a minute or two,
## into benchmarks/results/small-calls.md (make bench has the same table in its report)
bench-small: $(VENV)/.installed-test
	$(PY) -m tools.bench.small_calls --output benchmarks/results/small-calls.md

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check numbabn tools tests benchmarks examples
	$(VENV)/bin/ruff format --check numbabn tools tests benchmarks examples
	$(VENV)/bin/mypy

## bench-sync: cost of SyncBatchNorm's exchange on 2 ranks, beside plain BatchNorm2d
bench-sync: $(VENV)/.installed-test
	NUMBA_NUM_THREADS=1 $(VENV)/bin/mpiexec -n 2 $(PY) -m tools.bench.sync

## bench-dask: numbabn.dask.channel_stats beside Dask's mean and var, 2 GB on 2 worker processes
bench-dask: $(VENV)/.installed-test
	$(PY) -m tools.bench.chunked

clean:
	rm -rf $(VENV) .asv .pytest_cache .ruff_cache .mypy_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
