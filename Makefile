# deimv2-deploy: one command each on a fresh machine.
#   make demo   set up, then build/export/run/benchmark the detector end to end
#   make test   set up, then run the test suite (CPU only)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SHARED ?= $(abspath ../shared)

.PHONY: install test test-slow demo lint capi clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[export,train,dev]"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# Every size through every backend: minutes per size on 2 cores.
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

demo: $(STAMP)
	$(PY) -m deimv2_deploy.demo --shared $(SHARED)

lint: $(STAMP)
	$(VENV)/bin/ruff check deimv2_deploy tests benchmarks reference

capi: $(STAMP)
	$(VENV)/bin/deimv2-capi build --output build/capi

clean:
	rm -rf build out .pytest_cache
