"""The kopf operator for mailbeacon's ``Campaign`` resource.

It writes each Campaign's spec to the NATS KV bucket the proxies and aggregators watch,
removes it on deletion (statistics stay with the aggregator), copies the aggregator's
statistics into ``.status`` and enforces the reputation guardrails. The logic lives in
plain functions (:mod:`.status`, :mod:`.guardrails`); :mod:`.wiring` only connects them
to kopf, NATS and HTTP.
"""
