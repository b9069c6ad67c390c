"""The billing modes of an instance and the package periods (the seed's wording)."""

from __future__ import annotations

from datetime import timedelta
from enum import StrEnum

HOUR_S = 3600
DAY_S = 24 * HOUR_S


class BillingMode(StrEnum):
    PAY_AS_YOU_GO = "payAsYouGo"
    SPOT = "spot"  # billed like pay-as-you-go, at the spot price
    PACKAGE = "package"  # prepaid day/week/month term


class PackagePeriod(StrEnum):
    """Prepaid periods: daily = 24 h, weekly = 7x24 h, monthly = 30x24 h (the seed)."""

    DAY = "day"
    WEEK = "week"
    MONTH = "month"

    @property
    def seconds(self) -> int:
        return {"day": 1, "week": 7, "month": 30}[self.value] * DAY_S

    @property
    def duration(self) -> timedelta:
        return timedelta(seconds=self.seconds)
