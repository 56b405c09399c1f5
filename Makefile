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

# Two pytest workers (pytest-xdist), each test module on one worker so that its module-scoped
# tuning fixtures run once: 45 min instead of 56.5 on a 2-core Zen 3 (one worker left a core
# mostly idle: builds, subprocess start-up and waits are single-threaded).
test: $(STAMP)
	$(VENV)/bin/ruff check hwaware tests bench
	$(VENV)/bin/mypy hwaware
	$(PY) -m pytest -q -n 2 --dist loadscope

bench: $(STAMP)
	$(PY) bench/run.py

clean-venv:
	rm -rf $(VENV)
