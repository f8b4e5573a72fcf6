# The README's two set-up commands: `make demo` and `make test`. Each builds .venv itself and
# installs the Debian tools it needs (when run as root), so a fresh machine needs nothing else.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APT_PACKAGES := e2fsprogs
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test lint unit bench apt clean

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

demo: $(STAMP) apt
	PATH="$(CURDIR)/$(BIN):$$PATH" bash demo/demo.sh

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

unit: $(STAMP) apt
	$(BIN)/pytest -q

test: lint unit

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) demo-work .pytest_cache .mypy_cache .ruff_cache .hypothesis
