# Two entry points: `make demo` and `make test`. Each sets up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint format bench install clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) experiments/demo.py

# 2 workers: CI has 2 cores. Tests that need 8 simulated devices set XLA_FLAGS themselves.
test: $(STAMP) lint
	$(PY) -m pytest -n 2 --dist loadfile -q tests

# One style, checked before the tests run: `make format` fixes what it can.
lint: $(STAMP)
	$(VENV)/bin/pyink --check --quiet .
	$(VENV)/bin/ruff check --quiet .

format: $(STAMP)
	$(VENV)/bin/pyink --quiet .
	$(VENV)/bin/ruff check --quiet --fix .

bench: $(STAMP)
	$(PY) benchmarks/masks.py

clean:
	rm -rf $(VENV) outputs
