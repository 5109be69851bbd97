"""The contract every part shares: events, tracking URLs, campaign specs, settings, the build-info
series, and the rules on addresses and JSON all of them apply (docs/architecture.md "Layout").
It imports nothing else of mailbeacon."""
