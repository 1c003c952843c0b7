# Everyday commands. `make demo` sets everything up and runs the demo; `make test` runs the tests.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Extra arguments for pytest, e.g. `make test PYTEST_ARGS="-m unit -x"`.
PYTEST_ARGS ?=

.PHONY: help install install-bench broker test lint demo up clean bench bench-smoke

help:
	@echo "make install   create $(VENV) (if missing) and install the project with its dev tools"
	@echo "make broker    make sure a RabbitMQ answers at AMQP_URL (starts one if it can)"
	@echo "make test      install, make sure a broker answers, run every test tier"
	@echo "make lint      ruff check and mypy --strict"
	@echo "make demo      install, broker, start the services, place a sample order, show its status"
	@echo "make up        run every installed service (shop up)"
	@echo "make bench     the benchmark: raw aio-pika, FastStream, the kit and the system, several"
	@echo "               rounds; a table and bench/results/<time>.json (BENCH_ARGS=--help for options)"
	@echo "make bench-smoke  every benchmark case once with tiny sizes (CI): completes, no timing goal"
	@echo "make clean     remove caches, build output and the local databases in data/"

install: $(VENV)/.installed

# Reinstall only when pyproject.toml changed; the install is editable, so code changes need none.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

# The benchmark's extra tools (FastStream, the peer it is measured beside), beside the dev ones.
install-bench: $(VENV)/.installed-bench

$(VENV)/.installed-bench: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	touch $@

broker:
	scripts/ensure-broker

# pytest exits 5 when it collected no test: for us that is a broken suite, not a pass.
test: install broker
	@$(BIN)/pytest $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	exit $$status

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

demo:
	scripts/demo

# Extra arguments for the benchmark, e.g. `make bench BENCH_ARGS="--rounds 5 --cases fanout,kit"`.
BENCH_ARGS ?=

bench: install-bench broker
	$(BIN)/python -m bench $(BENCH_ARGS)

bench-smoke: install-bench broker
	$(BIN)/python -m bench --smoke $(BENCH_ARGS)

up: install
	$(BIN)/shop up

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info data
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
