"""What providers post: the generic JSON webhooks and one adapter per ESP (``esp/``), with their
limits and the replay guard."""
