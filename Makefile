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

.PHONY: setup eval test pytest lint test-slow clean

# pip byte-compiles every installed module one file at a time; here pip installs without compiling and compileall
# then compiles them on every core (2-core machine: 77 s + 35 s instead of about 3 min). Compiling must happen: Ray's
# workers do not write bytecode, so without it every worker process compiles torch and Ray again (the suite took
# twice as long). compileall exits 1 on the few test files in packages that target newer Pythons; pip ignores those
# too.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-compile "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --no-compile -e ".[test]"
	$(BIN)/python -m compileall -q -j 0 "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" > /dev/null || true
	touch $(STAMP)

setup: $(STAMP)

eval: $(STAMP)
	$(BIN)/invgan eval

# Two pytest workers (pytest-xdist), each taking whole test files, so a file's Ray instance stays one per module:
# the suite is mostly waiting (Ray start-ups, subprocesses), and two files at once fit the 2-core machine's
# 15-minute budget. Files go out in collection order, the longest first (tests/conftest.py: LONGEST_FIRST), not
# xdist's default of the most tests first, which started the 6-minute cluster file last. TEST_WORKERS=1: one process.
TEST_WORKERS ?= 2
# The static checks run beside the tests (make -j2): mypy's 35 s on one core overlap the suite's start-up waits.
test: $(STAMP)
	$(MAKE) --no-print-directory -j2 lint pytest

pytest: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=10

# Static checks (pyproject.toml: [tool.ruff], [tool.mypy]) and a strict build of the docs site (mkdocs.yml)
# into a temp folder it then deletes; part of `make test`, so CI runs them. No --quiet: with it, mkdocs 1.6
# hides the warnings and --strict no longer fails on them.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	site=$$(mktemp -d) && $(BIN)/mkdocs build --strict --site-dir "$$site"; status=$$?; rm -rf "$$site"; exit $$status

test-slow: $(STAMP)
	RUN_SLOW=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

clean:
	rm -rf $(VENV) runs .pytest_cache
