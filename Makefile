# strongroom: `make demo` and `make test` set up everything they need themselves.
SHELL := /bin/bash
APT_PACKAGES := postgresql-15 postgresql-client-15 redis-server clickhouse-server clickhouse-client zstd age pgbackrest
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup system venv test lint unit demo bench up clean

setup: system venv

# System packages from Debian (only what is missing), then uv from PyPI.
system:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@command -v uv >/dev/null 2>&1 || [ -x $(HOME)/.local/bin/uv ] || python3 -m pip install -q --user uv || python3 -m pip install -q --user --break-system-packages uv

venv: system
	@$(UV) sync --frozen --quiet

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

unit: venv
	$(VENV)/bin/pytest -q

test: lint unit

demo: setup
	$(PY) -m strongroom.demo

bench: setup
	$(PY) -m bench.run

clean:
	rm -rf .strongroom-demo
