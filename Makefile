# Everything a fresh machine needs is installed by these targets.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml deploy/kubernetes/install_tools.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,demo,bench]'
	$(PY) deploy/kubernetes/install_tools.py   # kubectl + helm for tests/deploy (pinned, ~5 s)
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/epp demo $(DEMO_ARGS)

bench: $(STAMP)
	$(VENV)/bin/epp bench all --docs docs/benchmarks.md $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
