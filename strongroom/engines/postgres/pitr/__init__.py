"""Point-in-time recovery: base backups, their tar stream, plans, restores."""
