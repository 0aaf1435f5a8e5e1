# make install | make test | make run | make bench | make chaos
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test run bench chaos lint clean

install: $(STAMP)

# Reinstalled whenever pyproject.toml changes; idempotent otherwise.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

run: install
	$(BIN)/python -m harness.demo

bench: install
	$(BIN)/python -m bench

chaos: install
	$(BIN)/python -m harness.chaos

clean:
	rm -rf $(VENV) .pytest_cache reminders.db reminders.db-*
