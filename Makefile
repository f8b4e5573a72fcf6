# The README's two set-up commands: `make demo` and `make test`. Each builds .venv itself and
# installs the Debian tools it needs (when run as root), so a fresh machine needs nothing else.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APT_PACKAGES := e2fsprogs
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test lint unit bench apt vm-assets clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

apt:
	@missing=""; for tool in mkfs.ext4:e2fsprogs debugfs:e2fsprogs; do \
	  command -v $${tool%%:*} >/dev/null 2>&1 || missing="$$missing $${tool##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $$missing; \
	  else echo "please install:$$missing" >&2; exit 1; fi; fi

# qemu, lvm2, thin-provisioning-tools, xfsprogs and a Debian kernel for the VM tests (cached).
vm-assets:
	@if [ "$$(id -u)" = 0 ]; then bash tests/vm/setup.sh; \
	else echo "make test: run as root once so tests/vm/setup.sh can install the VM tools" >&2; fi

demo: $(STAMP) apt
	PATH="$(CURDIR)/$(BIN):$$PATH" bash demo/demo.sh

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

unit: $(STAMP) apt vm-assets
	$(BIN)/pytest -q

test: lint unit

bench: $(STAMP)
	$(BIN)/python bench/run.py
	$(BIN)/python bench/incremental.py

clean:
	rm -rf $(VENV) demo-work .pytest_cache .mypy_cache .ruff_cache .hypothesis
