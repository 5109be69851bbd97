"""The kopf operator for Campaign resources (see deploy/ and DESIGN.md)."""
