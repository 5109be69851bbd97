"""NATS as every component uses it: JetStream connection and provisioning, publishing, the
spool, and the KV buckets mirrored in memory (campaigns, suppressions)."""
