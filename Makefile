# evcp: `make demo` runs a charging session on simulated hardware; `make test` runs the checks.
# Both create the virtual environment in .venv from requirements.lock on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest bench lock clean system-deps deb lock-hashes package-test bench-package

$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "evcp needs Python >= 3.11 (Debian bookworm's python3)"; exit 1; }
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv; \
		else echo "install python3-venv first: sudo apt-get install python3-venv"; exit 1; fi; \
		$(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	@# systemd-python (sd_notify, journald) is compiled against libsystemd: optional here.
	@$(BIN)/pip install -q systemd-python==235 2>/dev/null || \
		echo "note: systemd-python not built (needs libsystemd-dev pkg-config); the agent falls back to a plain sd_notify datagram"
	@touch $@

demo: $(STAMP)
	$(BIN)/evcp demo

# chrony serves NTP on loopback for the clock tests (it is started by the tests, with -x).
# Installed only in CI (CI=true, .ci/run): on a developer's machine it would replace
# systemd-timesyncd, so there it is only suggested.
system-deps:
	@command -v chronyd >/dev/null 2>&1 || { \
		if [ "$${CI:-}" = true ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chrony; \
		else echo "note: chrony is not installed; the NTP tests will be skipped (sudo apt-get install chrony: it replaces systemd-timesyncd)"; fi; }

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) system-deps
	$(BIN)/pytest

test: lint typecheck pytest

# The agent's own figures are taken as a charger runs it: the system's python3 (Debian's on
# bookworm, as the package uses) with the runtime dependencies only, in build/runtime-venv.
RUNTIME_VENV := build/runtime-venv
SYSTEM_PYTHON := $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo $(PYTHON))

$(RUNTIME_VENV)/.installed: requirements-runtime.txt pyproject.toml
	rm -rf $(RUNTIME_VENV) && $(SYSTEM_PYTHON) -m venv $(RUNTIME_VENV)
	$(RUNTIME_VENV)/bin/pip install -q -r requirements-runtime.txt 2>/dev/null || \
		$(RUNTIME_VENV)/bin/pip install -q $$(grep -v '^systemd-python' requirements-runtime.txt | grep -v '^#')
	@touch $@

# As the Debian package does (debian/rules): packaging/slim-venv after installing.
bench: $(STAMP) $(RUNTIME_VENV)/.installed
	$(RUNTIME_VENV)/bin/pip install -q --no-deps --force-reinstall .
	SLIM_KEEP_PIP=1 packaging/slim-venv $(RUNTIME_VENV)
	@echo "== bench/bench_agent.py (agent in $(RUNTIME_VENV))"
	@$(BIN)/python bench/bench_agent.py --python $(RUNTIME_VENV)/bin/python
	@for b in bench/bench_*.py; do [ $$b = bench/bench_agent.py ] && continue; \
		[ $$b = bench/bench_package.py ] && continue; \
		echo "== $$b"; $(BIN)/python $$b || exit 1; done

lock:
	rm -rf /tmp/evcp-lock && $(PYTHON) -m venv /tmp/evcp-lock
	/tmp/evcp-lock/bin/pip install -q '.[dev,demo]'
	{ echo "# Exact versions of every package for development, tests and the demo (pip install -r)."; \
	  echo "# Regenerate: make lock"; /tmp/evcp-lock/bin/pip freeze --exclude evcp; } > requirements.lock

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache

# The Debian package (dh-virtualenv): $(DEB_DIR)/evcp_*.deb, from the committed tree plus
# uncommitted edits of tracked files (git stash create). Needs: apt-get install debhelper
# dh-virtualenv python3-venv python3-dev libsystemd-dev pkg-config build-essential
# The build is hermetic: pip installs only files hashed in packaging/*.hashes.
DEB_DIR ?= build/deb
deb:
	rm -rf $(DEB_DIR) && mkdir -p $(DEB_DIR)/src
	rev=$$(git stash create); git archive $${rev:-HEAD} | tar -x -C $(DEB_DIR)/src
	cp -r packaging/debian $(DEB_DIR)/src/debian
	cp packaging/evcp.service $(DEB_DIR)/src/debian/evcp.service
	cd $(DEB_DIR)/src && PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b
	ls -l $(DEB_DIR)/*.deb

# The hashed locks the package build installs from (pip --require-hashes), for this machine's
# architecture and aarch64/armv7l wheels: run after changing requirements-runtime.txt.
lock-hashes:
	$(PYTHON) packaging/hash-lock packaging/requirements-runtime.hashes requirements-runtime.txt
	$(PYTHON) packaging/hash-lock packaging/requirements-build.hashes packaging/requirements-build.txt

# The package on a debootstrapped bookworm root (tests/package/): build, install, upgrade,
# purge, and under systemd-nspawn READY and a watchdog restart. Needs root.
package-test: $(STAMP)
	$(BIN)/pytest -q tests/package

# Package size, installed size, apt-get install to READY on the nspawn root, exposure (root).
bench-package: $(STAMP)
	$(BIN)/python bench/bench_package.py
