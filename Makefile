# lowmark: every target installs what it needs first and is fast when that is done.
#
#   make run      the whole pipeline live, then a verified verdict (ARGS="--duration 60 ...")
#   make test     everything but the torture runs
#   make torture / bench / lint / clean

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: help venv tools kafka-jars promtool deps test torture lint bench run clean distclean

help:
	@echo "make run        run lowmark end to end, live, then verify the backup (ARGS=\"--duration 60\")"
	@echo "make test       install what is missing, then run every test but the torture runs"
	@echo "make torture    long randomized runs (pytest -m torture)"
	@echo "make bench      run every benchmark in bench/ with its default arguments"
	@echo "make lint       ruff check . and mypy (its files and strictness: pyproject.toml)"
	@echo "make deps       venv + Debian tools + Kafka jars + promtool (what test and run need)"
	@echo "make clean      stop the default cluster, delete its data and build caches"

# The virtualenv, reinstalled whenever pyproject.toml changes.
venv: $(STAMP)
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "lowmark needs Python >= 3.11; $(PYTHON) is $$($(PYTHON) --version 2>&1)." \
	       "Run: make PYTHON=python3.11 ..." >&2; exit 1; }
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

# Debian packages: java, mvn, fio, qemu-utils, libnbd-bin, python3-libnbd, nbdkit, kcat (apt-get as root).
tools:
	@bash deploy/install-tools.sh

# Kafka's jars from Maven Central into ~/.cache/lowmark (or $$LOWMARK_CACHE), once.
kafka-jars: venv tools
	@$(PY) -m connectors.embedded_kafka.cli fetch

# promtool for the alert-rule tests, built with Go once into the same cache.
promtool:
	@bash deploy/prometheus/install-promtool.sh

deps: venv tools kafka-jars promtool

test: deps
	$(VENV)/bin/pytest -m "not torture"

torture: deps
	LOWMARK_TORTURE_JSON=bench/results/torture.json $(VENV)/bin/pytest -m torture

# Both run even when the first fails, so one CI log shows every finding; the exit status
# is not 0 when either found something (.ci/run fails on it).
lint: venv
	@status=0; \
	echo "$(VENV)/bin/ruff check ."; $(VENV)/bin/ruff check . || status=1; \
	echo "$(VENV)/bin/mypy"; $(VENV)/bin/mypy || status=1; \
	exit $$status

# Every bench/*.py that runs as a script (has a __main__ block), as `python -m bench.x`.
bench: venv tools kafka-jars
	@benches=$$(grep -l '^if __name__ == "__main__"' bench/*.py 2>/dev/null || true); \
	if [ -z "$$benches" ]; then echo "nothing is benchmarked yet"; exit 0; fi; \
	for file in $$benches; do \
	  module=$${file%.py}; module=$${module//\//.}; \
	  echo "== $(PY) -m $$module"; $(PY) -m $$module; \
	done

run: venv tools kafka-jars
	@if [ -x deploy/run-demo.sh ]; then exec deploy/run-demo.sh $(ARGS); fi; \
	$(VENV)/bin/lowmark kafka up; \
	echo; \
	echo "lowmark: the embedded Kafka cluster runs in the background (logs: .lowmark/kafka/default/)."; \
	echo "  status:  $(VENV)/bin/lowmark kafka status"; \
	echo "  stop:    $(VENV)/bin/lowmark kafka down"

clean:
	@if [ -x $(VENV)/bin/lowmark ] && [ -d .lowmark/kafka/default ]; then \
	  $(VENV)/bin/lowmark kafka down --wipe; fi
	rm -rf .pytest_cache .ruff_cache .mypy_cache .hypothesis build dist *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
