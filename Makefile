# strongroom: `make demo` and `make test` set up everything they need themselves.
SHELL := /bin/bash
APT_PACKAGES := postgresql-15 postgresql-client-15 redis-server clickhouse-server clickhouse-client zstd age pgbackrest chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup system venv test lint unit demo bench up clean fuzz

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

# Byte-compile the venv and our packages once (as the Docker image does): every Python
# start then reads .pyc files instead of compiling ~0.3 s of imports from source, which
# matters on machines that set PYTHONDONTWRITEBYTECODE. Up-to-date files are skipped.
venv: system
	@$(UV) sync --frozen --quiet
	@$(PY) -m compileall -q -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" strongroom flows blocks bench tests >/dev/null || true

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

unit: venv
	$(VENV)/bin/pytest -q

test: lint unit

# GAUNTLET=1: the PostgreSQL step on the generated gauntlet dataset (strongroom/demo_gauntlet.py)
demo: setup
	$(PY) -m strongroom.demo $(if $(filter-out 0,$(GAUNTLET)),--gauntlet)

bench: setup
	$(PY) -m bench.run

# Long coverage-guided fuzz runs of every parser that reads bucket bytes
# (tests/fuzz/run.py); `make test` runs a short pass. FUZZ_RUNS inputs per parser.
FUZZ_RUNS ?= 1000000
fuzz: venv
	$(PY) -m tests.fuzz.run all --runs $(FUZZ_RUNS) --record

clean:
	rm -rf .strongroom-demo

# ---- the Prefect UI on this machine (strongroom/deploy/up.py) ---------------------------
# `make up`: throwaway PostgreSQL (+ Redis, ClickHouse when installed), a Prefect server
# with its UI on 127.0.0.1, `strongroom bootstrap` onto a process pool and a process
# worker, all in the background; prints the UI address. `make down` stops exactly those.
.PHONY: down

up: setup
	$(PY) -m strongroom.deploy.up up

down:
	@if [ -x $(PY) ]; then $(PY) -m strongroom.deploy.up down; else echo "nothing to stop"; fi
