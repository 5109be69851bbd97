"""The SMTP proxy: per-recipient tracked copies relayed to the real upstream."""
