# make install | make test | make test-fast | make lint | make run | make bench | make chaos
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install system-tools test test-fast run bench chaos lint clean

install: $(STAMP) system-tools

# What only Debian packages give: promtool (prometheus, for the alert-rule tests), wrk (bench) and
# faketime (its libfaketime: the chaos runs' replicas with clocks off, `clock-skew`). As root they
# are installed with apt-get; otherwise the one command that would is printed (under CI=true a test
# or chaos run that needs a missing one fails, so a failed apt-get only warns). Checked on every
# run: cheap when present.
SYSTEM_TOOLS := promtool:prometheus wrk:wrk faketime:faketime
system-tools:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
		command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair#*:}"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	command="apt-get update && apt-get install -y --no-install-recommends$$missing"; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing$$missing: $$command"; \
		sh -c "$$command" || echo "apt-get failed (tests needing$$missing fail under CI=true): $$command"; \
	else \
		echo "missing Debian package(s)$$missing; to install them run as root: $$command"; \
	fi

# The service with its dev extra, and the fake providers (fakes/: a distribution of their own, never
# in the service's wheel or image), in one resolve: the fakes' `reminders` is this checkout's.
# Reinstalled whenever either pyproject.toml changes; idempotent otherwise.
$(STAMP): pyproject.toml fakes/pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]' -e ./fakes
	touch $(STAMP)

# The linter ([tool.ruff] in pyproject.toml) over the whole tree; `make test` runs it first.
lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/python -m pytest -q

# Local work: everything but the multi-process and long tests (marked `slow`); under a minute.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

run: install
	$(BIN)/python -m harness.demo

bench: install
	$(BIN)/python -m bench

# The generic mode (RELIABILITY.md, docs/chaos/), then each real-provider mode (its own section).
chaos: install
	$(BIN)/python -m harness.chaos
	$(BIN)/python -m harness.chaos_providers --provider twilio
	$(BIN)/python -m harness.chaos_providers --provider telnyx

clean:
	rm -rf $(VENV) .pytest_cache reminders.db reminders.db-*
