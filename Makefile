# make demo: the main job. make test: the test suite. Both set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build by default; on a CUDA machine set TORCH='torch' (or reuse an existing venv).
TORCH ?= torch==2.13.0
EXTRAS ?= dev,triton
# make test: pytest processes at once, each running a share of the tests (tests/parallel.py)
JOBS ?= 2

.PHONY: demo test bench lint format clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m fastae demo $(ARGS)

test: $(VENV)/.installed
	$(PY) tests/parallel.py $(JOBS) $(ARGS)

bench: $(VENV)/.installed
	$(PY) -m pytest bench --benchmark-only $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
