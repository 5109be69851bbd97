"""Migration scripts, oldest first; the same scripts run on SQLite and PostgreSQL."""
