# flask_nucleon_amqp: `make run` serves the example app, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help venv broker run test bench lint clean

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

venv: $(STAMP)  ## create .venv and install the package with its test tools

broker:  ## make sure RabbitMQ runs on 127.0.0.1:5672 (start or install it)
	./scripts/ensure-broker.sh

run: venv broker  ## serve the example app with gunicorn's gevent workers on :8000
	cd example_app && ../$(VENV)/bin/flask --app app amqp declare
	cd example_app && ../$(VENV)/bin/gunicorn -c gunicorn.conf.py wsgi:app

test: venv broker  ## run the test suite against the local broker
	$(PY) -m pytest $(PYTEST_ARGS)

bench: venv broker  ## run the benchmarks (ratios to raw puka, pika, kombu; then HTTP under gunicorn)
	$(PY) bench/bench.py $(BENCH_ARGS)
	$(PY) bench/http_bench.py $(HTTP_BENCH_ARGS)

lint: venv  ## ruff
	$(PY) -m pip install -q ruff
	$(VENV)/bin/ruff check flask_nucleon_amqp tests

clean:  ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache build *.egg-info
