# cxr-screen: every command a user runs. The Makefile only wires CLIs together; logic lives in
# `python -m <package>.<module>` modules, each with --help.

SHELL := /bin/bash
PYTHON_BOOTSTRAP ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= ../shared/data/cxr3
REPORTS ?= reports
export DATA_DIR

.PHONY: help install lock test demo audit bench-data clean

help: ## list targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk -F':.*?## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip==26.3"
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .

install: $(PY) ## create .venv with the locked dependencies and the project (editable)

lock: ## re-resolve requirements.txt and rewrite constraints.txt
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip freeze --exclude-editable > constraints.txt

test: install ## run the test suite (real servers, real images, small subsets)
	$(PY) -m pytest

demo: install audit ## the main job on the default data
	@echo "demo: audit report at $(REPORTS)/audit/summary.md"

audit: install ## data audit: flags, duplicates, exclusions, figures -> reports/audit
	$(PY) -m training.audit --data-dir $(DATA_DIR) --out $(REPORTS)/audit

bench-data: install ## images/s of the data pipeline with and without the preprocessed cache
	$(PY) -m training.bench_data --data-dir $(DATA_DIR) --out $(REPORTS)/bench/data.json

clean: ## remove caches and local runs (keeps .venv and committed reports)
	rm -rf .cache mlruns mlartifacts model-store runs
