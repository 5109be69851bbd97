"""Who may read and change what the aggregator serves (README "Aggregator: authentication").

``policy`` decides from the settings and a request's credentials, ``sessions`` signs the
pages' login cookies, ``web`` wires both into aiohttp, ``login`` serves the login form.
"""
