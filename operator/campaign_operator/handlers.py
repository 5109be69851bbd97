"""Entry point for ``kopf run -m campaign_operator.handlers``.

Importing this module is the operator process's start: it builds the one settings object
from the environment (``MAILBEACON_*``) and registers the handlers in kopf's default
registry. ``mailbeacon operator`` does the same through :func:`campaign_operator.main.run`.
"""

from __future__ import annotations

import kopf

from campaign_operator.wiring import register
from mailbeacon.contract.settings import Settings

OPERATOR = register(kopf.get_default_registry(), Settings())
