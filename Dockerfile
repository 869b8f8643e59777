# The image strongroom's flow runs (and the Kubernetes worker) run in.
#   docker build -t registry.example.com/strongroom:0.1.0 . && docker push ...
# then set that name as the `image` job variable (prefect.yaml / bootstrap config).
#
# Debian 12 matches the machines strongroom is tested on: PostgreSQL 15 client tools
# (pg_dump, pg_restore, pg_basebackup, psql), redis-cli, clickhouse-client, zstd, age.
# Runs as UID 10001 with a read-only root filesystem: everything writable is under
# /scratch (an emptyDir in deployments/k8s-base-job-template.json).
FROM python:3.11-slim-bookworm

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      postgresql-client-15 redis-tools clickhouse-client zstd age tini ca-certificates \
 && rm -rf /var/lib/apt/lists/*

ENV UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1 \
    UV_PYTHON_DOWNLOADS=never \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN pip install --no-cache-dir uv

WORKDIR /opt/strongroom
# dependencies first (cached while only the code changes), exactly as locked
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
COPY blocks/ blocks/
COPY flows/ flows/
COPY strongroom/ strongroom/
COPY deployments/ deployments/
COPY prefect.yaml ./
RUN uv sync --frozen --no-dev \
 && .venv/bin/python -m compileall -q blocks flows strongroom

RUN groupadd --gid 10001 strongroom \
 && useradd --uid 10001 --gid 10001 --home-dir /scratch --no-create-home strongroom \
 && mkdir -p /scratch && chown 10001:10001 /scratch
ENV PATH=/opt/strongroom/.venv/bin:$PATH \
    HOME=/scratch \
    TMPDIR=/scratch \
    PREFECT_HOME=/scratch/.prefect
USER 10001:10001

# The Kubernetes worker passes the flow-run command as the container's args.
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["strongroom", "--help"]
