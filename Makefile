# Set-up and routine commands. Only python3 (3.10+) is needed to start.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: help demo test test-long fuzz soak test-gpu gpu-static lint asv-quick bench bench-small bench-eval-floor bench-wide bench-gpu bench-sync bench-dask docs docs-check dist clean

## help: list every target with what it does
help:
	@sed -n 's/^## \([a-z-]*\): /\1\t/p' $(MAKEFILE_LIST) | expand -t 16

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-base: pyproject.toml numbabn/__init__.py | $(PY)
	$(PIP) -e .
	touch $@

# The test oracle's exact PyTorch is pinned in tests/constraints.txt, not in the extras.
$(VENV)/.installed-test: pyproject.toml numbabn/__init__.py tests/constraints.txt | $(PY)
	$(PIP) -c tests/constraints.txt -e ".[test]"
	touch $@

$(VENV)/.installed-bench: pyproject.toml numbabn/__init__.py tests/constraints.txt | $(PY)
	$(PIP) -c tests/constraints.txt -e ".[test,bench]"
	touch $@

## demo: normalise a batch, check it against NumPy, run a few train/eval steps
demo: $(VENV)/.installed-base
	$(PY) -m numbabn

## test: lint, the whole test suite on every core (docs and guide code included), each asv benchmark once
test: $(VENV)/.installed-test lint
	$(PY) -m pytest -n auto --dist loadfile -m "not long and not lint"
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
	$(GPU_RUN) -m pytest -p no:cacheprovider tests/test_cuda.py tests/test_cuda_arrays.py \
		tests/test_cuda_half.py tests/test_fused.py

## bench-gpu: numbabn on the GPU beside PyTorch's CUDA batch norm and a streaming roofline
bench-gpu:
	$(GPU_RUN) -m tools.bench --device cuda

## gpu-check: every GPU check in one run of under 8 minutes into OUT=dir
# (log, summary, report, JUnit XML); DRY_RUN=1 runs it in the CUDA simulator on tiny shapes;
# STEPS=a,b picks steps.
.PHONY: gpu-check
gpu-check:
	$(if $(OUT),,$(error name the results folder: make gpu-check OUT=dir))
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) -m tools.bench.gpu_check --out $(OUT) \
		$(if $(DRY_RUN),--dry-run) $(if $(STEPS),--steps $(STEPS))

## gpu-static: the CUDA kernels compiled for sm_90 without a GPU: registers, spills, occupancy
# and SASS per element into benchmarks/results/gpu-static.md.
gpu-static: $(VENV)/.installed-test
	NUMBA_ENABLE_CUDASIM=0 $(PY) -m tools.bench.gpu_static --out benchmarks/results/gpu-static.md

## asv-quick: run each asv benchmark once in this environment (fails on a broken one)
# The cold-start ones, which compile everything each time, are left to a full asv run.
asv-quick: $(VENV)/.installed-test
	$(VENV)/bin/asv machine --yes > /dev/null
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/asv run --python=same --quick --show-stderr \
		--bench '^(?!bench_startup\.Startup)'


## bench: numbabn beside PyTorch, NumPy and the memory roofline (tables, JSON, PNG)
bench: $(VENV)/.installed-bench
	$(PY) -m tools.bench

## bench-small: small module calls beside torch.nn's and a one-call floor (a minute or two)
# Into benchmarks/results/small-calls.md (make bench has the same table in its report).
bench-small: $(VENV)/.installed-test
	$(PY) -m tools.bench.small_calls --output benchmarks/results/small-calls.md

## bench-eval-floor: eval beside PyTorch's and a compiled loop of the same arithmetic (floor)
bench-eval-floor: $(VENV)/.installed-test
	$(PY) -m tools.bench.eval_floor --runs 3 --output benchmarks/results/eval-floor.md

## bench-wide: BatchNorm1d on (N, C) matrices, C = 16 to 8192, beside torch.nn's and NumPy's
bench-wide: $(VENV)/.installed-test
	$(PY) -m tools.bench.wide --runs 3 --output benchmarks/results/wide.md

## lint: ruff (rules and format), mypy, and mypy --strict on the README's and guide's code
lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check numbabn tools tests benchmarks examples docs
	$(VENV)/bin/ruff format --check numbabn tools tests benchmarks examples docs
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -p no:cacheprovider -m lint tests/test_doc_types.py

## bench-sync: cost of SyncBatchNorm's exchange on 2 ranks, beside plain BatchNorm2d
bench-sync: $(VENV)/.installed-test
	NUMBA_NUM_THREADS=1 $(VENV)/bin/mpiexec -n 2 $(PY) -m tools.bench.sync

## bench-dask: numbabn.dask.channel_stats beside Dask's mean and var, 2 GB on 2 worker processes
bench-dask: $(VENV)/.installed-test
	$(PY) -m tools.bench.chunked

## docs: the documentation site into docs/_build/html (Sphinx, warnings as errors)
docs: $(VENV)/.installed-test
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html
	@echo "open docs/_build/html/index.html"

## docs-check: the built site in headless Chromium: pages render, no image is broken
# Chromium from the system's packages (installed with apt-get when missing); a screenshot
# of the home page goes to docs/_build/home.png.
docs-check: docs
	@command -v chromium > /dev/null || command -v chromium-browser > /dev/null || \
		{ echo "installing Chromium from the system's packages"; \
		  apt-get update -q && apt-get install -y -q chromium; }
	$(PY) docs/check_site.py docs/_build/html --screenshot docs/_build/home.png

## dist: the sdist and the wheel into dist/
dist: $(VENV)/.installed-test
	$(PY) -m build --no-isolation --outdir dist .

## clean: remove the venv, build outputs and tool caches (not the kernel cache)
clean:
	rm -rf $(VENV) .asv .pytest_cache .ruff_cache .mypy_cache build dist docs/_build docs/_generated
	find . -name __pycache__ -prune -exec rm -rf {} +
