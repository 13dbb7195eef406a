# Quick start: `make eval` runs the main job, `make test` runs the test suite.
# Both create .venv and install the project with its dependencies when needed.
PYTHON ?= python3
VENV ?= .venv
# Installed before the project so the `torch>=2.4` requirement is already met: on a machine that has
# the CPU wheel locally pip takes it; elsewhere PyPI's build (CUDA on Linux). Override for another build:
#   make test TORCH_SPEC="torch==2.5.1"
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-stamp
BIN := $(VENV)/bin

.PHONY: setup eval test lint test-slow clean

# --no-compile: Python compiles what it imports on first use instead of pip byte-compiling every installed module
# up front (measured on the 2-core machine: 77 s instead of about 3 min for a fresh setup).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-compile "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --no-compile -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

eval: $(STAMP)
	$(BIN)/invgan eval

# Two pytest workers (pytest-xdist), each taking whole test files, so a file's Ray instance stays one per module:
# the suite is mostly waiting (Ray start-ups, subprocesses), and two files at once fit the 2-core machine's
# 15-minute budget. TEST_WORKERS=1 runs it in one process.
TEST_WORKERS ?= 2
test: $(STAMP) lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=10

# Static checks (pyproject.toml: [tool.ruff], [tool.mypy]) and a strict build of the docs site (mkdocs.yml)
# into a temp folder it then deletes; part of `make test`, so CI runs them. No --quiet: with it, mkdocs 1.6
# hides the warnings and --strict no longer fails on them.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	site=$$(mktemp -d) && $(BIN)/mkdocs build --strict --site-dir "$$site"; status=$$?; rm -rf "$$site"; exit $$status

test-slow: $(STAMP)
	RUN_SLOW=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) runs .pytest_cache
