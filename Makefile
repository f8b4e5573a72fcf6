# The README's two set-up commands: `make demo` and `make test`. Each builds .venv itself and
# installs the Debian tools it needs (when run as root), so a fresh machine needs nothing else.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test lint unit bench man apt-demo apt-test vm-assets clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# The NBD tests talk to the real clients (libnbd-bin: nbdinfo, nbdcopy; python3-libnbd: nbdsh;
# qemu-utils: qemu-img, qemu-io, qemu-nbd; nbd-client; nbdkit as a reference server).
# nbd-client's package only registers its boot-time service (with an empty /etc/nbdtab);
# installing it starts nothing. systemd-analyze verifies the units `systemd install` writes;
# fincore (util-linux-extra) shows what of a file is in the page cache.
DEMO_TOOLS := mkfs.ext4:e2fsprogs debugfs:e2fsprogs
TEST_TOOLS := $(DEMO_TOOLS) nbdinfo:libnbd-bin nbdcopy:libnbd-bin nbdfuse:libnbd-bin nbdsh:python3-libnbd \
	qemu-img:qemu-utils qemu-io:qemu-utils qemu-nbd:qemu-utils nbdkit:nbdkit \
	nbd-client:nbd-client systemd-analyze:systemd fincore:util-linux-extra

# `command:package` pairs: installs the packages whose command is missing (root only).
apt-demo: TOOLS = $(DEMO_TOOLS)
apt-test: TOOLS = $(TEST_TOOLS)
apt-demo apt-test:
	@missing=""; for tool in $(TOOLS); do \
	  PATH="$$PATH:/usr/sbin:/sbin" command -v $${tool%%:*} >/dev/null 2>&1 \
	    || missing="$$missing $${tool##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends $$missing; \
	  else echo "please install:$$missing" >&2; exit 1; fi; fi

# qemu, lvm2, thin-provisioning-tools, xfsprogs and a Debian kernel for the VM tests (cached).
vm-assets:
	@if [ "$$(id -u)" = 0 ]; then bash tests/vm/setup.sh; \
	else echo "make test: run as root once so tests/vm/setup.sh can install the VM tools" >&2; fi

demo: $(STAMP) apt-demo
	PATH="$(CURDIR)/$(BIN):$$PATH" bash demo/demo.sh

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

# Spread over every core, a test file per worker (files share fixtures and servers); the VM
# files are collected first (tests/conftest.py) and kept first (xdist would otherwise order
# files by their number of tests) so the longest work starts first.
unit: $(STAMP) apt-test vm-assets
	$(BIN)/pytest -q -n auto --dist loadfile --no-loadscope-reorder

test: lint unit

# The man page, generated from the argument parser (argparse-manpage, a dev dependency):
# `man -l man/snapship.1`. Not committed: it is made from the code, like the --help texts.
man: man/snapship.1
man/snapship.1: $(STAMP) $(wildcard src/snapship/cli/*.py)
	@mkdir -p man
	$(BIN)/python -m snapship.cli.manpage $@

bench: $(STAMP)
	$(BIN)/python bench/run.py
	$(BIN)/python bench/incremental.py

clean:
	rm -rf $(VENV) demo-work man .pytest_cache .mypy_cache .ruff_cache .hypothesis
