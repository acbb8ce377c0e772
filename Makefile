# flask_nucleon_amqp: `make run` serves the example app, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LINT_STAMP := $(VENV)/.lint-installed

.DEFAULT_GOAL := help
.PHONY: help venv broker databases browser run test test-all bench lint docs dist clean check-fixes

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

venv: $(STAMP)  ## create .venv and install the package with its test tools

broker:  ## make sure RabbitMQ runs on 127.0.0.1:5672 (start or install it)
	./scripts/ensure-broker.sh

databases:  ## make sure PostgreSQL and MariaDB run for the outbox tests (start or install them)
	./scripts/ensure-databases.sh

browser:  ## make sure chromium and chromedriver run (installs them with apt-get when root), for the browser test
	./scripts/ensure-browser.sh

run: venv broker  ## serve the example app (the chat room page) with gunicorn's gevent workers on :8000
	cd example_app && ../$(VENV)/bin/flask --app app amqp declare
	@echo "The chat room: open http://127.0.0.1:8000/ in a browser (two windows, two users). Ctrl-C stops."
	cd example_app && ../$(VENV)/bin/gunicorn -c gunicorn.conf.py wsgi:app

test: venv broker databases browser  ## run the test suite against the local broker
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: broker databases browser  ## run the test suite on every Python 3.10..3.13 found, each in its own .venv-3.X
	./scripts/test-all.sh

bench: venv broker databases  ## run the benchmarks (ratios to raw puka, pika, kombu; then HTTP under gunicorn)
	$(PY) bench/bench.py $(BENCH_ARGS)
	$(PY) bench/http_bench.py $(HTTP_BENCH_ARGS)
	$(PY) bench/outbox_bench.py $(OUTBOX_BENCH_ARGS)

$(LINT_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[lint]'
	touch $(LINT_STAMP)

check-fixes: venv broker  ## revert each puka fix in turn (in a temp copy) and check that its tests fail
	$(VENV)/bin/python scripts/check_fixes.py

lint: $(LINT_STAMP)  ## ruff, and mypy --strict on the package and the tests (settings in pyproject.toml)
	$(VENV)/bin/ruff check flask_nucleon_amqp tests example_app bench
	$(VENV)/bin/mypy

docs: venv  ## build the Sphinx site into docs/_build/html, warnings as errors
	$(VENV)/bin/sphinx-build -W --keep-going -b html docs docs/_build/html

dist: venv  ## build the sdist and the wheel into dist/
	$(PY) -m build

clean:  ## remove the venv and caches
	rm -rf $(VENV) .venv-3.* .pytest_cache .mypy_cache .ruff_cache build dist docs/_build *.egg-info
