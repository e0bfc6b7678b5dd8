# Everything a fresh machine needs is installed by these targets.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install tools test pytest compose-test demo bench clean

$(STAMP): pyproject.toml deploy/kubernetes/install_tools.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,demo,bench]'
	$(PY) deploy/kubernetes/install_tools.py   # kubectl + helm for tests/deploy (pinned, ~5 s)
	touch $(STAMP)

install: $(STAMP) tools

# h2load (Debian's nghttp2-client): the independent HTTP/2 load client of tests/extproc/test_h2load.py.
# Installed with apt where there is one (CI runs as root on Debian); elsewhere install it yourself.
tools:
	@command -v h2load >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client >/dev/null); } || \
	  echo "warning: h2load not installed (Debian package nghttp2-client); tests/extproc/test_h2load.py needs it"

# The suite and the compose test side by side (one core each; the compose test mostly waits on dpkg,
# docker and its containers); each one's output is printed whole when it ends.
test: $(STAMP) tools
	@$(MAKE) --no-print-directory -j2 --output-sync=target pytest compose-test

pytest: $(STAMP) tools
	$(PY) -m pytest -q $(PYTEST_ARGS)

# docker-compose.yml built and run under a real Docker engine (tests/compose, deploy/README.md).
# Fails on a machine that cannot run containers, unless EPP_COMPOSE_TEST_SKIP=1.
compose-test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests/compose $(COMPOSE_TEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/epp demo $(DEMO_ARGS)

bench: $(STAMP)
	$(VENV)/bin/epp bench all --docs docs/benchmarks.md $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
