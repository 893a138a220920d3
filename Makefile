# Everything runs inside a local virtual environment; `make demo` and `make test` set it up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.prtool-installed
# The torch build to install; override for another platform, e.g. TORCH_SPEC="torch torchvision".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install test test-fast demo bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev,mixed]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

demo: install
	$(VENV)/bin/prtool demo --out runs/demo

bench: install
	$(PY) benchmarks/run_suite.py benchmarks/suites/testbed.toml

lint: install
	$(VENV)/bin/ruff check prtool tests

clean:
	rm -rf runs .pytest_cache build *.egg-info prtool.egg-info

# Mutation testing of the core against the tests that cover it (mutmut; files and tests in pyproject.toml
# [tool.mutmut]). MUTATE_SCOPE picks the functions: the pruned encoder's select/gather path and its peers, validation
# checks, the rankings store's verify/resume path, predictor/weights checks, schedules. `make mutate MUTATE_SCOPE=`
# mutates every function of those files. Score and survivors: `mutmut results`, benchmarks/mutate_score.py. Not in CI.
MUTATE_SCOPE ?= prtool.export.validate.*compare_kept__* prtool.export.validate.*topk_order_violations__* \
	prtool.encoder.pruned.*select__* prtool.encoder.pruned.*tokens_before__* \
	prtool.encoder.schedule.*tokens_per_block__*
.PHONY: mutate
mutate: install
	$(PY) -m pip install -q -e '.[dev,mutate]'
	rm -rf mutants
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children $${MUTATE_JOBS:-2} \
		$(foreach g,$(MUTATE_SCOPE),'$(g)') || true
	$(PY) benchmarks/mutate_score.py $(foreach g,$(MUTATE_SCOPE),'$(g)')

# Consumers outside Python (export/cpp, export/web); tests/test_consumers.py builds them itself too.
.PHONY: consumers
consumers: install
	PYTHON=$(abspath $(PY)) bash export/cpp/setup.sh
	cd export/web && npm ci --no-audit --no-fund

# --- GPU machine check (benchmarks/device_check.sh): the wheels that machine lacks, the plan, the CPU smoke ---
DEVICE_PLATFORMS := --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64

.PHONY: device-wheels device-check-dry device-check-smoke

device-wheels:
	rm -rf .whl && mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(DEVICE_PLATFORMS) -d .whl -r benchmarks/device_wheels.txt
	du -ch .whl/*.whl

device-check-dry: install
	$(PY) benchmarks/device_check.py --dry-run

device-check-smoke: install
	$(PY) benchmarks/device_check.py runs/device-check-smoke --smoke
