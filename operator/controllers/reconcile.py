"""The one reconcile contract of the three kinds (TrainJob, QuantizeJob, InferenceService).

Every kind runs the same level-based loop, one kopf daemon per object, so two passes over one
object never overlap:

    observe   the object (the newest copy we know of), its children from kopf indexes (no LIST per
              pass) and whatever else the kind reads (an InferenceService scrapes its pods' metrics)
    decide    a pure function per kind: Observed -> Decision(status, events, actions, requeue_after)
    write     ONE status write, a PUT carrying the object's resourceVersion: a decision taken on a
              stale view fails with 409 Conflict, the object is read again and decided again at
              once; nothing is ever overwritten blindly, and nothing is acted on a stale view
    events    posted only after that write went through (as JobSet does), so an Event never
              announces a state the object does not hold
    act       create / apply / delete / scale children; each is idempotent by name (AlreadyExists
              and NotFound are success, apply is server-side apply), so an operator killed at any
              point does the same again on its next pass

An action the API server refuses for good (403, 404, 422) is handed back to the kind
(`Kind.refused`), which may answer with a second decision (TrainJob: Created=False naming the
cause; QuantizeJob, InferenceService: Failed/InvalidSpec), written and announced the same way.
A spec the operator cannot run (`observe` or a builder in `decide` raises ValueError) is terminal Failed with reason
InvalidSpec, the field named in the message, and one Event: the same for every kind
(`invalid_spec`). Any other error is retried with a doubling backoff and a ReconcileError Event.

Wake-ups: the kind's indexes call `Kind.wake` on every watch event of a child, and a new
metadata.generation wakes the daemon too (`Kind.saw_generation`); otherwise the decision's
`requeue_after` says when to look again (None: nothing left to watch, the daemon ends; kopf
starts a new one when the operator restarts).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Generic, Literal, TypeVar, cast

import kopf

from lmforge.operator import clock
from lmforge.operator.api import reasons as r
from lmforge.operator.api.base import StatusModel
from lmforge.operator.controllers.bodies import plain
from lmforge.operator.decision import (
    Action,
    AdapterCall,
    Apply,
    Create,
    Decision,
    Delete,
    DeleteCollection,
    Event,
    Scale,
    invalid_spec,
)
from lmforge.operator.kube import ApiError, ControllerRuntime, KubeApi, Object, Resource, resource_of

COALESCE_SECONDS = 0.2  # children change together (a gang's pods): one pass for the burst
DELETING_POLL_SECONDS = 5.0  # marked deleted: kopf stops the daemon soon
MAX_ERROR_BACKOFF_SECONDS = 60.0
REFUSALS = (403, 404, 422)  # answers to a child that retrying alone will not fix

StatusT = TypeVar("StatusT", bound=StatusModel)
ObservedT = TypeVar("ObservedT")
MemoryT = TypeVar("MemoryT", bound="Memory")


@dataclass(frozen=True, slots=True)
class Refusal:
    """The API server refused `action` with one of REFUSALS."""

    action: Action
    error: ApiError

    @property
    def name(self) -> str:
        action = self.action
        if isinstance(action, Create | Apply):
            return str(action.obj.get("metadata", {}).get("name", ""))
        return getattr(action, "name", "")


class Refused(Exception):
    """Raised by `execute` for the first refused action of a run."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(f"{refusal.name}: {refusal.error}")
        self.refusal = refusal


@dataclass(slots=True)
class Memory:
    """This process's memory of one object: how to wake its daemon, the newest copy of the object
    we know of (our own status write may be newer than the watch has delivered yet), the
    generation last seen and the generation whose children were applied. Kinds that remember more
    subclass it. Losing it (a restart) costs one re-apply, never a wrong decision."""

    wake: asyncio.Event = field(default_factory=asyncio.Event)
    latest: Object | None = None
    generation: int | None = None
    applied_generation: int | None = None


def resource_version(obj: Mapping[str, Any] | None) -> int:
    """etcd revisions: a newer copy of an object has a larger one; -1 when unknown."""
    if obj is None:
        return -1
    try:
        return int(obj["metadata"]["resourceVersion"])
    except (KeyError, TypeError, ValueError):
        return -1


def newest(a: Object | None, b: Object) -> Object:
    return a if a is not None and resource_version(a) > resource_version(b) else b


# --- what a kind provides ---------------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class Kind(ControllerRuntime, ABC, Generic[ObservedT, StatusT, MemoryT]):
    """One custom resource kind's part of the contract; the instance lives in kopf's memo and
    also holds the API client (ControllerRuntime) and the per-object memories."""

    resource: ClassVar[Resource]
    status_model: ClassVar[type[StatusModel]]
    memories: dict[tuple[str, str], MemoryT] = field(default_factory=dict)

    @abstractmethod
    def new_memory(self) -> MemoryT: ...

    @abstractmethod
    async def observe(self, obj: Object, memory: MemoryT, indexes: Mapping[str, kopf.Index]) -> ObservedT:
        """Everything `decide` needs, read now. Raises ValueError for a spec this operator cannot
        run (the message names the field)."""

    @abstractmethod
    def decide(self, observed: ObservedT) -> Decision[StatusT]: ...

    def invalid(self, obj: Object, message: str, now: datetime) -> Decision[StatusT]:
        status: Any = self.status_model.model_validate(plain(obj.get("status")) or {})
        return invalid_spec(status, obj["metadata"].get("generation"), message, now)

    def refused(self, obj: Object, observed: ObservedT, refusal: Refusal) -> Decision[StatusT] | None:
        """A second decision for a refused action, written like the first; None: raise it (retried)."""
        return None

    async def call(self, memory: MemoryT, action: AdapterCall) -> None:
        """An HTTP action on a replica (InferenceService: LoRA adapters); failures are the kind's to record."""
        raise NotImplementedError(f"{type(self).__name__} has no HTTP actions")

    def acted(self, memory: MemoryT, observed: ObservedT, decision: Decision[StatusT]) -> None:
        """After the actions went through: what this process remembers of them."""

    # --- memory and wake-ups (called from the kind's indexes) -------------------------------------

    def memory(self, namespace: str, name: str) -> MemoryT:
        key = (namespace, name)
        if key not in self.memories:
            self.memories[key] = self.new_memory()
        return self.memories[key]

    def wake(self, namespace: str, name: str) -> None:
        memory = self.memories.get((namespace, name))
        if memory is not None:
            memory.wake.set()

    def saw_generation(self, namespace: str, name: str, generation: int | None) -> None:
        """A new metadata.generation (a spec edit) wakes the daemon at once; our own status writes
        do not (they do not move the generation)."""
        memory = self.memories.get((namespace, name))
        if memory is not None and generation != memory.generation:
            memory.generation = generation
            memory.wake.set()


# --- one pass ---------------------------------------------------------------------------------------


async def reconcile(
    kind: Kind[Any, Any, Any],
    memory: Memory,
    body: Mapping[str, Any],
    indexes: Mapping[str, kopf.Index],
    logger: kopf.Logger,
    now: datetime,
) -> float | None:
    """One observe/decide/write/announce/act pass. Returns seconds until the next pass (0: at
    once), or None when the object is finished (or gone) and nothing is left to watch."""
    obj = newest(memory.latest, plain(body))
    meta = obj["metadata"]
    if (meta["namespace"], meta["name"]) in kind.released:
        return None  # its namespace is being deleted and kopf no longer watches it
    if meta.get("deletionTimestamp"):
        return DELETING_POLL_SECONDS  # kopf stops the daemon and runs the delete handler
    try:
        observed = await kind.observe(obj, memory, indexes)
        decision = kind.decide(observed)  # its builders refuse what the cluster cannot run
    except ValueError as exc:  # a CRD older/newer than this operator, a location without a reader
        logger.error("invalid spec: %s", exc)
        return await _settle(kind, memory, obj, kind.invalid(obj, str(exc), now))
    if await _write(kind, memory, obj, decision.status) != "written":
        return _after_failed_write(memory)  # decided on a stale view: nothing is acted on it
    _announce(obj, decision.events)
    try:
        await execute(kind.api, decision.actions, lambda call: kind.call(memory, call))
    except Refused as refused:
        logger.warning("refused: %s", refused)
        follow = kind.refused(newest(memory.latest, obj), observed, refused.refusal)
        if follow is None:
            raise refused.refusal.error from None
        return await _settle(kind, memory, newest(memory.latest, obj), follow)
    kind.acted(memory, observed, decision)
    if decision.applies_generation is not None:
        memory.applied_generation = decision.applies_generation
        return 0.0  # observedGeneration may move now: look again at once
    return decision.requeue_after


async def _settle(
    kind: Kind[Any, Any, Any], memory: Memory, obj: Object, decision: Decision[Any]
) -> float | None:
    """A decision without actions (an invalid spec, a refusal): the status write, then its Events."""
    if await _write(kind, memory, obj, decision.status) != "written":
        return _after_failed_write(memory)
    _announce(obj, decision.events)
    return decision.requeue_after


def _after_failed_write(memory: Memory) -> float | None:
    """409: decide again at once on the copy just read; 404 (or gone meanwhile): stop."""
    return 0.0 if memory.latest is not None else None


async def _write(
    kind: Kind[Any, Any, Any], memory: Memory, obj: Object, status: StatusModel
) -> Literal["written", "conflict", "gone"]:
    """The one status write: a PUT with the object's resourceVersion, only when the status changed.
    On 409 (someone wrote the object since: the user, kopf's annotations, our own last write) the
    object is read again into `memory.latest`; on 404 `memory.latest` is cleared."""
    if status == _status(kind, obj):
        return "written"
    try:
        memory.latest = await kind.api.replace_status({**obj, "status": status.to_k8s()})
    except ApiError as exc:
        if exc.status not in (404, 409):
            raise
        meta = obj["metadata"]
        memory.latest = (
            await kind.api.get(kind.resource, meta["namespace"], meta["name"]) if exc.status == 409 else None
        )
        return "conflict" if memory.latest is not None else "gone"
    return "written"


def _announce(obj: Object, events: tuple[Event, ...]) -> None:
    """Events go out only after the status write that holds their state went through."""
    for event in events:
        # kopf reads only apiVersion/kind/metadata of the object: a plain dict is as good as a Body
        kopf.event(
            cast(kopf.Body, obj), type=event.type, reason=event.reason, message=event.message[: r.MAX_MESSAGE]
        )


def _status(kind: Kind[Any, Any, Any], obj: Object) -> StatusModel:
    return kind.status_model.model_validate(plain(obj.get("status")) or {})


async def execute(
    api: KubeApi, actions: tuple[Action, ...], http: Callable[[AdapterCall], Awaitable[None]] | None = None
) -> None:
    """Run `actions` in order, each run of actions of one type concurrently (a gang's pods are
    created at once). Raises Refused for the first refused action (in order) of a run, after the
    whole run went. AdapterCall actions go to `http` (the kind's `call`), after the status write
    like every other action."""
    start = 0
    while start < len(actions):
        end = start
        while end < len(actions) and type(actions[end]) is type(actions[start]):
            end += 1
        run = actions[start:end]
        results = await asyncio.gather(*(_one(api, action, http) for action in run), return_exceptions=True)
        for action, result in zip(run, results, strict=True):
            if isinstance(result, ApiError) and result.status in REFUSALS:
                raise Refused(Refusal(action, result))
        for result in results:
            if isinstance(result, BaseException):
                raise result
        start = end


async def _one(api: KubeApi, action: Action, http: Callable[[AdapterCall], Awaitable[None]] | None) -> None:
    if isinstance(action, AdapterCall):
        if http is None:
            raise NotImplementedError("an AdapterCall needs an HTTP executor")
        await http(action)
    elif isinstance(action, Create):
        await api.create(action.obj)  # None when it exists: same name, same object
    elif isinstance(action, Apply):
        await api.apply(action.obj, action.field_manager)
    elif isinstance(action, Delete):
        await api.delete(
            _resource(action), action.namespace, action.name, grace_period_seconds=action.grace_period_seconds
        )
    elif isinstance(action, DeleteCollection):
        await api.delete_collection(_resource(action), action.namespace, action.label_selector)
    else:
        await api.scale(
            _resource(action), action.namespace, action.name, action.replicas, action.field_manager
        )


def _resource(action: Delete | DeleteCollection | Scale) -> Resource:
    return resource_of({"apiVersion": action.api_version, "kind": action.kind})


# --- the loop ---------------------------------------------------------------------------------------


async def run(
    kind: Kind[Any, Any, Any],
    body: kopf.Body,
    stopped: kopf.DaemonStopped,
    indexes: Mapping[str, kopf.Index],
    logger: kopf.Logger,
) -> None:
    """The daemon of one object: passes until it is finished, deleted or the operator stops.
    A failing pass (API or connection error) is retried after 2, 4, ... 60 s with a Warning Event."""
    meta = body.get("metadata", {})
    key = (meta.get("namespace", ""), meta.get("name", ""))
    memory = kind.memory(*key)
    memory.generation = meta.get("generation")
    failures = 0
    try:
        while not stopped:
            memory.wake.clear()
            try:
                delay = await reconcile(kind, memory, body, indexes, logger, clock.now())
                failures = 0
            except Exception as exc:  # noqa: BLE001 - API errors, quota, invalid user volumes: retry, visibly
                failures += 1
                delay = min(2.0**failures, MAX_ERROR_BACKOFF_SECONDS)
                logger.warning("reconcile failed (retry in %.0fs): %s", delay, exc)
                kopf.event(
                    body,
                    type="Warning",
                    reason=r.ReasonReconcileError,
                    message=str(exc)[: r.MAX_MESSAGE],
                )
            if delay is None:
                return  # finished and nothing left to do: the daemon (and its finalizer) go away
            if delay > 0 and await _sleep(memory.wake, stopped, delay):
                await asyncio.sleep(COALESCE_SECONDS)  # let a burst of child events land before looking
    finally:
        kind.memories.pop(key, None)


async def _sleep(wake: asyncio.Event, stopped: kopf.DaemonStopped, seconds: float) -> bool:
    """Sleep until woken, stopped or `seconds` passed; True if woken by an event."""
    waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stopped.wait())]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    return wake.is_set() and not stopped
