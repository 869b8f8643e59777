"""PostgreSQL: logical dumps and restores (pg_dump/pg_restore), connections, psql."""
