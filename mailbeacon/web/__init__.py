"""HTTP plumbing every component serves with: health, readiness and metrics routes, JSON
errors, serving with connection limits, and the stop that drops no request."""
