"""ESP webhook adapters, one module per provider, all with the same two functions.

``ADAPTERS`` maps the ``{provider}`` of ``POST /webhooks/{provider}`` to its module. A new
provider is a module with ``SOURCE``, ``verify`` and ``parse`` (see ``tracker.webhooks.esp.base``)
added here.
"""

from __future__ import annotations

from typing import Protocol

from tracker.webhooks.esp import mailgun, postmark, sendgrid, ses
from tracker.webhooks.esp.base import Authentic, ParseContext, VerifyContext, WebhookRequest, WebhookResult


class Adapter(Protocol):
    SOURCE: str

    async def verify(self, request: WebhookRequest, context: VerifyContext) -> Authentic: ...

    def parse(self, request: WebhookRequest, context: ParseContext) -> WebhookResult: ...


ADAPTERS: dict[str, Adapter] = {
    "sendgrid": sendgrid,
    "mailgun": mailgun,
    "ses": ses,
    "postmark": postmark,
}
