"""Relaying the copies upstream: the connection pool, DATA as a stream, suppressed recipients,
and what the app is told once the upstream answered."""
