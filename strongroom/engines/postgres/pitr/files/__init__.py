"""File-level physical PostgreSQL backups (full / differential / incremental): see
docs/physical.md."""
