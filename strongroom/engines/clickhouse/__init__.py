"""ClickHouse: logical backups (DDL + Native data per part), plans, restores."""
