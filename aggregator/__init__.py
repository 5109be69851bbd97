"""The aggregator: event stream to exact per-campaign statistics, pages and metrics."""
