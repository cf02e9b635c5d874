# pgcast — `make help` lists the targets.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EMBEDDED := $(VENV)/.embedded
DEV := $(VENV)/.dev

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv with pgcast and what production needs (nothing else)

dev: $(DEV) ## what `make install` does, plus the test, lint and bench tools and the embedded Postgres

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# editable: `git pull` updates the code in .venv; pyproject.toml changes reinstall
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $(STAMP)

$(EMBEDDED): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[embedded]'
	touch $(STAMP) $(EMBEDDED)

$(DEV): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP) $(EMBEDDED) $(DEV)

demo: $(EMBEDDED) ## run the whole system on an embedded Postgres and show it working
	PGCAST_HOME="$${PGCAST_HOME:-$(CURDIR)/.pgcast}" $(BIN)/python -m pgcast.bin.demo

test: $(DEV) licenses ## run the unit and integration tests on a real Postgres (5 minutes on a quiet 2-core machine)
	$(BIN)/pytest

test-acceptance: $(DEV) ## run the acceptance ring: real pgcast processes, moto's SES server, chaos
	$(BIN)/pytest tests/acceptance

licenses: $(DEV) ## refuse a copyleft licence among the runtime dependencies (not the dev tools)
	$(BIN)/python -m tests.licenses

test-wheel: $(DEV) ## build the wheel, install it alone in a fresh venv, run pgcast from it
	$(BIN)/pytest -p no:cacheprovider tests/wheel

# Debian's chromium drives the browser tests (Playwright's own browser download is not used)
CHROMIUM := /usr/bin/chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium

test-browser: $(DEV) $(CHROMIUM) ## run the dashboard's tests in a real headless Chromium
	$(BIN)/pytest tests/browser

screenshot: $(DEV) $(CHROMIUM) ## regenerate docs/dashboard.png with the browser test's own steps
	PGCAST_SCREENSHOT_DIR=$(CURDIR)/docs $(BIN)/pytest -q tests/browser \
		-k test_import_create_send_watch_pause_resume

test-pg15: $(DEV) ## integration, acceptance and PgBouncer rings on Debian's PostgreSQL 15 (apt-get installs it)
	$(BIN)/python -m tests.realpg --version 15 --pgbouncer -- \
		$(BIN)/pytest tests/integration tests/acceptance tests/pooled

test-unit: $(DEV) ## run the unit tests only (no database)
	$(BIN)/pytest tests/unit

lint: $(DEV) ## ruff and mypy
	$(BIN)/ruff check .
	$(BIN)/python -m tests.typecheck

bench: $(DEV) ## run bench/ and rewrite bench/RESULTS.md
	$(BIN)/python -m bench.run

clean: ## stop the embedded Postgres and remove .pgcast/
	-$(BIN)/pgcast db stop
	rm -rf .pgcast

.PHONY: help install dev demo test licenses test-wheel test-browser screenshot test-pg15 test-unit lint bench clean
