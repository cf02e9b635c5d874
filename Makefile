# pgcast — `make help` lists the targets.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv with pgcast and everything it needs

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: install ## run the whole system on an embedded Postgres and show it working
	PGCAST_HOME="$${PGCAST_HOME:-$(CURDIR)/.pgcast}" $(BIN)/python -m bin.demo

test: install ## run every test (unit, integration, acceptance) on a real Postgres
	$(BIN)/pytest

# Debian's chromium drives the browser tests (Playwright's own browser download is not used)
CHROMIUM := /usr/bin/chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium

test-browser: install $(CHROMIUM) ## run the dashboard's tests in a real headless Chromium
	$(BIN)/pytest tests/browser

screenshot: install $(CHROMIUM) ## regenerate docs/dashboard.png with the browser test's own steps
	PGCAST_SCREENSHOT_DIR=$(CURDIR)/docs $(BIN)/pytest -q tests/browser \
		-k test_import_create_send_watch_pause_resume

test-pg15: install ## integration, acceptance and PgBouncer rings on Debian's PostgreSQL 15 (apt-get installs it)
	$(BIN)/python -m tests.realpg --version 15 --pgbouncer -- \
		$(BIN)/pytest tests/integration tests/acceptance tests/pooled

test-unit: install ## run the unit tests only (no database)
	$(BIN)/pytest tests/unit

lint: install ## ruff and mypy
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: install ## run bench/ and rewrite bench/RESULTS.md
	$(BIN)/python -m bench.run

clean: ## stop the embedded Postgres and remove .pgcast/
	-$(BIN)/pgcast db stop
	rm -rf .pgcast

.PHONY: help install demo test test-browser screenshot test-pg15 test-unit lint bench clean
