"""Who may read and change what the aggregator serves (docs/aggregator.md "Authentication").

``policy`` decides from the settings and a request's credentials, ``sessions`` signs the
pages' login cookies, ``web`` wires both into aiohttp, ``login`` serves the login form.
"""
