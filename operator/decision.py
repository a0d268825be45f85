"""The data of the reconcile contract (operator/controllers/reconcile.py): what a kind's pure
`decide` returns. Plain frozen dataclasses, no I/O and no client: the builders and the decisions
import them, the controllers execute them. Children are named by apiVersion + kind (the client maps
them to REST paths), so a decision stays a value a test compares whole."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from lmforge.operator.api import constants as c
from lmforge.operator.api import reasons as r
from lmforge.operator.api.base import StatusModel
from lmforge.operator.builders.conditions import has_condition, set_condition

FIELD_MANAGER = "lmforge-operator"
RESYNC_SECONDS = 60.0  # look at a quiet object this often even without events

StatusT = TypeVar("StatusT", bound=StatusModel)
Object = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Event:
    """One Kubernetes Event about the object, posted after the status write."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class Create:
    """POST; an object of that name that exists already counts as created."""

    obj: Object


@dataclass(frozen=True, slots=True)
class Apply:
    """Server-side apply: the object holds what `obj` sets afterwards, whatever was there."""

    obj: Object
    field_manager: str = FIELD_MANAGER


@dataclass(frozen=True, slots=True)
class Delete:
    """Delete one object (grace 0: at once, e.g. a pod stuck on a lost node); gone counts as deleted."""

    api_version: str
    kind: str
    namespace: str
    name: str
    grace_period_seconds: int | None = None


@dataclass(frozen=True, slots=True)
class DeleteCollection:
    """Delete every object of the kind in the namespace that matches the selector (one call)."""

    api_version: str
    kind: str
    namespace: str
    label_selector: str


@dataclass(frozen=True, slots=True)
class Scale:
    """spec.replicas through the /scale subresource (the field manager says who scaled)."""

    api_version: str
    kind: str
    namespace: str
    name: str
    replicas: int
    field_manager: str = FIELD_MANAGER


@dataclass(frozen=True, slots=True)
class AdapterCall:
    """POST /v1/load_lora_adapter {lora_name, lora_path} or /v1/unload_lora_adapter {lora_name} on one
    replica (`base_url`: http://<pod ip>:8000). Idempotent: loading one loaded already and unloading one
    gone count as done; a refusal (the engine's 400 naming the file) is the adapter's lastError."""

    pod: str
    base_url: str
    verb: Literal["load", "unload"]
    name: str
    path: str | None = None


Action = Create | Apply | Delete | DeleteCollection | Scale | AdapterCall


@dataclass(frozen=True, slots=True)
class Decision(Generic[StatusT]):
    """What one pass does, in this order: write `status` (when it differs from the stored one),
    post `events`, run `actions` (in order; a run of actions of the same type goes concurrently),
    look again after `requeue_after` seconds (None: never, the object is finished).

    `applies_generation`: the actions (re)apply the children of this metadata.generation; once they
    went through, the kind's memory says so and the next pass comes at once (it may now write
    status.observedGeneration: the children hold that generation)."""

    status: StatusT
    events: tuple[Event, ...] = ()
    actions: tuple[Action, ...] = ()
    requeue_after: float | None = RESYNC_SECONDS
    applies_generation: int | None = None


def invalid_spec(
    status: StatusT, generation: int | None, message: str, now: datetime, *, also_false: tuple[str, ...] = ()
) -> Decision[StatusT]:
    """The same terminal answer for every kind: phase Failed, condition Failed=True with reason
    InvalidSpec and `message` (which names the field), `also_false` conditions (InferenceService:
    Ready) False with the same reason, observedGeneration, completionTime where the kind has one,
    one Warning Event. A Failed object stays as it is (Failed never changes)."""
    if is_terminal(status):
        return Decision(status, requeue_after=None)
    message = message[: r.MAX_MESSAGE]
    conditions = set_condition(
        status.conditions,  # type: ignore[attr-defined]
        r.ConditionFailed,
        True,
        r.ReasonInvalidSpec,
        message,
        now,
        generation,
    )
    for type_ in also_false:
        conditions = set_condition(conditions, type_, False, r.ReasonInvalidSpec, message, now, generation)
    update: dict[str, Any] = {
        "phase": c.PhaseFailed,
        "conditions": conditions,
        "observed_generation": generation,
    }
    if "completion_time" in type(status).model_fields:
        update["completion_time"] = now
    return Decision(
        status.model_copy(update=update),
        events=(Event("Warning", r.ReasonInvalidSpec, message),),
        requeue_after=None,
    )


def is_terminal(status: StatusModel) -> bool:
    """Succeeded, or Failed with condition Failed=True (a job's end, or an invalid spec): nothing
    moves the object again. An InferenceService whose replicas fail is phase Failed without that
    condition: a level, it recovers when they do."""
    phase = getattr(status, "phase", None)
    conditions = getattr(status, "conditions", ())
    return phase == c.PhaseSucceeded or (
        phase == c.PhaseFailed and has_condition(conditions, r.ConditionFailed)
    )
