"""The headline numbers of a campaign's statistics, as its ``.status`` shows them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

# status field -> field of the aggregator's statistics (docs/architecture.md "Statistics")
COUNTS = {
    "totalRecipients": "total_recipients",
    "sent": "sent_count",
    "failed": "failed_count",
    "delivered": "delivered_count",
    "bounced": "bounced_count",
    "complained": "complained_count",
    "unsubscribed": "unsubscribed_count",
    "uniqueOpens": "unique_opens",
    "humanUniqueOpens": "human_unique_opens",
    "uniqueClicks": "unique_clicks",
    "humanUniqueClicks": "human_unique_clicks",
}
RATES = {
    "deliveryRate": "delivery_rate",
    "openRate": "open_rate",
    "clickRate": "click_rate",
    "bounceRate": "bounce_rate",
    "complaintRate": "complaint_rate",
}
STATUS_FIELDS = (*COUNTS, *RATES)


class InvalidStatistics(ValueError):
    """The aggregator answered with something that is not a statistics object."""


@dataclass(frozen=True)
class Headline:
    """What the operator needs from a campaign's statistics; zero for a campaign with no mail yet."""

    total_recipients: int = 0
    sent: int = 0
    failed: int = 0
    delivered: int = 0
    bounced: int = 0
    complained: int = 0
    unsubscribed: int = 0
    unique_opens: int = 0
    human_unique_opens: int = 0
    unique_clicks: int = 0
    human_unique_clicks: int = 0
    delivery_rate: float = 0.0
    open_rate: float = 0.0
    click_rate: float = 0.0
    bounce_rate: float = 0.0
    complaint_rate: float = 0.0

    @classmethod
    def from_statistics(cls, statistics: Mapping[str, Any]) -> Headline:
        values: dict[str, Any] = {}
        try:
            for status_field, source in COUNTS.items():
                values[_attribute(status_field)] = _count(statistics.get(source, 0))
            for status_field, source in RATES.items():
                values[_attribute(status_field)] = round(float(statistics.get(source, 0.0)), 2)
        except (TypeError, ValueError) as exc:
            raise InvalidStatistics(f"statistics field is not a number: {exc}") from exc
        return cls(**values)

    @classmethod
    def from_status(cls, status: Mapping[str, Any]) -> Headline | None:
        """The numbers a Campaign's ``.status`` last showed; None when it shows none (never
        read yet) or something that is not numbers."""
        if not any(name in status for name in STATUS_FIELDS):
            return None
        try:
            values: dict[str, Any] = {}
            for name in COUNTS:
                values[_attribute(name)] = _count(status.get(name, 0))
            for name in RATES:
                values[_attribute(name)] = float(status.get(name, 0.0))
        except (TypeError, ValueError):
            return None
        return cls(**values)

    def as_status(self) -> dict[str, Any]:
        """The status fields, camelCase as the CRD names them."""
        values = asdict(self)
        return {name: values[_attribute(name)] for name in STATUS_FIELDS}


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(repr(value))
    return int(value)


def _attribute(status_field: str) -> str:
    """``humanUniqueOpens`` -> ``human_unique_opens``; ``sent`` -> ``sent``."""
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in status_field)


def numbers_changed(current_status: Mapping[str, Any], headline: Headline) -> bool:
    wanted = headline.as_status()
    return any(current_status.get(name) != value for name, value in wanted.items())
