"""Alembic migrations of the aggregator's SQL schema (run by :mod:`aggregator.store.migrate`)."""
