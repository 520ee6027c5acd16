# goflow: `make test` and `make run` bootstrap everything from python3, make and npm.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

NODE_STAMP := node_modules/.installed

.PHONY: test run bench bench-quick clean venv

venv: $(STAMP)

# MCP servers from npm used by the tests and the quick start (pinned in package-lock.json).
$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

# Re-install when the project metadata changes (a stale venv is rebuilt in place).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP) $(NODE_STAMP)
	$(BIN)/python -m pytest -q

run: $(STAMP)
	$(BIN)/goflow run examples/demo.yaml

bench: $(STAMP)
	$(BIN)/python bench/run.py

bench-quick: $(STAMP)
	$(BIN)/python bench/run.py --quick

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache node_modules
