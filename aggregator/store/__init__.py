"""The store: the database, its tables and migrations, set-based SQL, time formats, and
retention. Ingest writes through it and the read side reads it; it imports neither."""
