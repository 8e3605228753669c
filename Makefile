# Two commands on a fresh machine: `make run` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: run test lint bench system-deps clean

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

## run: the demo model server behind servegate on the default ports; Ctrl-C stops both
run: $(INSTALLED)
	$(BIN)/python -m demo.run

## test: install what the tests need (Python and Debian packages), lint, run every test
test: $(INSTALLED) system-deps lint
	$(BIN)/python -m pytest

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# promtool and a real Prometheus for the metrics tests; docker-compose to validate the
# compose file (no Docker engine is needed for `docker-compose config`).
system-deps:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null \
		&& command -v docker-compose >/dev/null || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends prometheus docker-compose >/dev/null; }

## bench: memory under 200 MiB bodies, and success under a crash-looping model against nginx
## and HAProxy when installed (run by hand; numbers go to docs/benchmarks.md)
bench: $(INSTALLED)
	$(BIN)/python bench/memory.py
	$(BIN)/python bench/crash_loop.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
