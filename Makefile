# The two commands a new user needs (see README.md):
#   make demo   set up .venv, then tune + compile + time a sample network on this CPU
#   make test   set up .venv, then ruff, mypy and the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test setup bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hwaware demo

test: $(STAMP)
	$(VENV)/bin/ruff check hwaware tests bench
	$(VENV)/bin/mypy hwaware
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/run.py

clean-venv:
	rm -rf $(VENV)
