"""The one helper that writes `status.conditions` (metav1.Condition semantics) for every kind."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Literal

from lmforge.operator.api.base import Condition


def set_condition(
    conditions: Iterable[Condition],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None,
) -> list[Condition]:
    """Upsert condition `type_` in place (the list keeps its order); lastTransitionTime moves only
    when the status flips, as Kubernetes' meta.SetStatusCondition does."""
    value: Literal["True", "False"] = "True" if status else "False"
    out: list[Condition] = []
    found = False
    for cond in conditions:
        if cond.type != type_:
            out.append(cond)
            continue
        found = True
        since = cond.last_transition_time if cond.status == value else now
        out.append(_condition(type_, value, reason, message, since, generation))
    if not found:
        out.append(_condition(type_, value, reason, message, now, generation))
    return out


def has_condition(conditions: Iterable[Condition], type_: str) -> bool:
    """Condition `type_` is present and True."""
    return any(cond.type == type_ and cond.status == "True" for cond in conditions)


def find_condition(conditions: Iterable[Condition], type_: str) -> Condition | None:
    return next((cond for cond in conditions if cond.type == type_), None)


def _condition(
    type_: str,
    value: Literal["True", "False"],
    reason: str,
    message: str,
    since: datetime,
    generation: int | None,
) -> Condition:
    return Condition(
        type=type_,
        status=value,
        reason=reason,
        message=message,
        last_transition_time=since,
        observed_generation=generation,
    )
