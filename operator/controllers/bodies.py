"""Turning kopf's live views into plain data the pure builders and decisions can take."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def plain(value: Any) -> Any:
    """A kopf Body (nested mapping views) as plain dicts and lists, safe to keep and compare."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value
