"""The ingest side: the JetStream consumer, the decoder, and batches of events applied to the
store exactly once (messages, counters, parked events, suppressions). It writes; the read side
never imports it."""
