# goflow: `make test` and `make run` bootstrap everything from python3, make and npm.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Exact versions with hashes of every Python package (runtime, test and build), generated
# from pyproject.toml by `make lock`; installs never resolve anything themselves.
LOCK := requirements.lock
UV_VERSION := 0.13.9

NODE_STAMP := node_modules/.installed
# The browser the dashboard tests drive (Debian's package; Playwright never downloads one).
CHROMIUM := /usr/bin/chromium

.PHONY: test run bench bench-quick clean venv lock soak vendor

venv: $(STAMP)

# MCP servers from npm used by the tests and the quick start (pinned in package-lock.json).
$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

# Install exactly the lock (hash-checked), then goflow itself without resolving anything;
# a stale venv is rebuilt in place when the lock or the project metadata changes.
$(STAMP): $(LOCK) pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Regenerate the lock after changing dependencies in pyproject.toml (the one command).
# The build backend (setuptools, wheel: [build-system] in pyproject.toml) and pip are
# locked too, so `--no-build-isolation` above builds with pinned tools.
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q uv==$(UV_VERSION)
	printf 'setuptools>=77\nwheel\npip\n' | $(BIN)/uv pip compile pyproject.toml - \
	    --extra test --generate-hashes --python-version 3.11 \
	    --custom-compile-command 'make lock' -o $(LOCK)

# Installed where missing when we may (root, as in CI); otherwise say how.
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	else echo "the dashboard tests need Debian's chromium: sudo apt-get install chromium"; fi

# The dashboard's JavaScript libraries, copied from node_modules (pinned in package-lock.json)
# into goflow/web/static/vendor/ with their licences; the copies are committed, so users
# need no npm and no build step. Run after changing their versions in package.json.
vendor: $(NODE_STAMP)
	sh goflow/web/vendor.sh

test: $(STAMP) $(NODE_STAMP) $(CHROMIUM)
	$(BIN)/python -m pytest -q

run: $(STAMP)
	$(BIN)/goflow run examples/demo.yaml

bench: $(STAMP)
	$(BIN)/python bench/run.py

bench-quick: $(STAMP)
	$(BIN)/python bench/run.py --quick

# Chaos soak (not part of `make test`): `make soak SOAK_SECONDS=600`; see docs/reliability.md.
SOAK_SECONDS ?= 180
soak: $(STAMP)
	$(BIN)/python bench/soak.py --duration $(SOAK_SECONDS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache node_modules
