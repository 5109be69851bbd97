"""The tracker: open pixel, click redirects, unsubscribe and ESP webhooks."""
