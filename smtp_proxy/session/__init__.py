"""The SMTP session with the app: the listener, reading DATA, who may relay (networks and AUTH),
session limits, and what the session log may say."""
