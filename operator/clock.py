"""The operator's one clock. Status timestamps and condition transition times are whole seconds
(RFC 3339 in the API carries no fraction, so a fraction would make every comparison with a
stored time flip); the autoscaler's windows use the precise time."""

from __future__ import annotations

from datetime import UTC, datetime


def now() -> datetime:
    """UTC now, whole seconds: what status fields and conditions hold."""
    return datetime.now(UTC).replace(microsecond=0)


def precise_now() -> datetime:
    """UTC now with microseconds: scrape times of the autoscaler's history."""
    return datetime.now(UTC)


def parse_time(value: str | None) -> datetime | None:
    """An API timestamp ('2026-01-02T03:04:05Z') as an aware datetime; None for none."""
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
