"""The WAL archive: the hot path PostgreSQL calls (push, fetch), its store and checks.

Nothing here imports Prefect, pydantic models of blocks or the CLI: ``strongroom-wal``
starts once per 16 MiB segment and must stay fast."""
