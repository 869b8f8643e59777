"""Redis: RDB snapshots over the replication protocol, logical dumps, restores."""
