"""The kopf operator for Campaign resources (see deploy/ and docs/architecture.md "Campaigns")."""
