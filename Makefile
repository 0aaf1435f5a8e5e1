# make install | make lock | make test | make test-fast | make lint | make run | make bench | make chaos
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The lock files: every package pinned with its hashes (docs/decisions/0244). runtime.txt is what
# the image installs (the service's dependencies and the build backend), dev.txt what `make
# install` installs (that, the dev extra and the fakes' dependencies, at the same versions).
RUNTIME_LOCK := requirements/runtime.txt
DEV_LOCK := requirements/dev.txt
LOCK := $(BIN)/uv pip compile --quiet --generate-hashes --universal --python-version 3.11 \
	--custom-compile-command "make lock"

.PHONY: install lock system-tools test test-fast run bench chaos lint clean

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

# The locked dependencies (hashes checked: nothing is resolved anew), then the service and the fake
# providers (fakes/: a distribution of their own, never in the service's wheel or image) from this
# checkout, editable, without dependencies: the lock has them all. The build backend comes from the
# lock too (--no-build-isolation). Reinstalled whenever the lock or either pyproject.toml changes;
# idempotent otherwise.
$(STAMP): $(DEV_LOCK) pyproject.toml fakes/pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes -r $(DEV_LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e . -e ./fakes
	touch $(STAMP)

# Refreshes both lock files from pyproject.toml (after adding, removing or bounding a dependency;
# or to take newer releases): resolved with uv for every platform, Python 3.11. The dev lock is
# constrained by the runtime lock, so tests run the versions the image ships. Commit the result.
lock: $(STAMP)
	$(LOCK) pyproject.toml requirements/build.in -o $(RUNTIME_LOCK)
	$(LOCK) requirements/dev.in -c $(RUNTIME_LOCK) --no-emit-package reminders --no-emit-package reminders-fakes \
		-o $(DEV_LOCK)

# The linter ([tool.ruff] in pyproject.toml) over the whole tree; `make test` runs it first.
lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/python -m pytest -q

# Local work: everything but the multi-process and long tests (marked `slow`); under a minute.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# Twilio mode by default (its scripted callees and the call-back); TELEPHONY_PROVIDER=generic make run
# for the generic provider. Either way the events arrive at a receiver the demo starts.
run: install
	$(BIN)/python -m harness.demo --provider $(or $(TELEPHONY_PROVIDER),twilio)

bench: install
	$(BIN)/python -m bench

# The generic mode (RELIABILITY.md, docs/chaos/), then each real-provider mode (its own section).
chaos: install
	$(BIN)/python -m harness.chaos
	$(BIN)/python -m harness.chaos_providers --provider twilio
	$(BIN)/python -m harness.chaos_providers --provider telnyx

clean:
	rm -rf $(VENV) .pytest_cache reminders.db reminders.db-*
