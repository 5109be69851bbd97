"""The read side: the JSON API, the HTML pages and charts, the live statistics stream, and the
queries and statistics they show. It reads the store and never imports ingest."""
