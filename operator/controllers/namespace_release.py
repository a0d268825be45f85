"""Deleting a namespace must never hang on our finalizer.

kopf needs a finalizer on every object with a daemon or a timer (all three kinds here), and removes
it when it sees the object's deletion. But kopf stops watching a namespace at the first event that
marks the namespace deleted (kopf/_core/reactor/observation.py, `revise_namespaces`), before the
namespace controller marks our objects deleted; kopf then never sees their deletion, and the
namespace stays Terminating forever ("NamespaceFinalizersRemaining: lmforge.dev/finalizer").

So every SWEEP_SECONDS this task lists the namespaces being terminated (one LIST with a field
selector) and, in those this operator watches, takes our finalizer off every object of ours that is
marked deleted. Nothing else is needed: the namespace controller deletes every child anyway. The
controllers are told (`ControllerRuntime.released`) so the daemon and the timers of those objects,
which kopf no longer stops, stop by themselves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from lmforge.operator.kube import (
    INFERENCESERVICES,
    NAMESPACES,
    QUANTIZEJOBS,
    TRAINJOBS,
    ApiError,
    KubeApi,
    Resource,
)

SWEEP_SECONDS = 5.0
KINDS: tuple[tuple[Resource, str], ...] = (
    (TRAINJOBS, "trainjob"),
    (INFERENCESERVICES, "inferenceservice"),
    (QUANTIZEJOBS, "quantizejob"),
)  # resource, memo attribute


def terminating(namespaces: Iterable[Mapping[str, Any]], watched: tuple[str, ...]) -> list[str]:
    """Names of the namespaces being deleted that this operator watches (all when cluster-wide)."""
    names = [ns["metadata"]["name"] for ns in namespaces if ns.get("metadata", {}).get("deletionTimestamp")]
    return [name for name in names if not watched or name in watched]


def releases(objects: Iterable[Mapping[str, Any]], finalizer: str) -> list[tuple[str, dict[str, Any]]]:
    """(name, merge patch) for each object marked deleted that still carries `finalizer`: the patch
    keeps every other finalizer and carries the resourceVersion (409 if it changed meanwhile)."""
    out = []
    for obj in objects:
        meta = obj.get("metadata") or {}
        finalizers = list(meta.get("finalizers") or ())
        if meta.get("deletionTimestamp") and finalizer in finalizers:
            rest = [f for f in finalizers if f != finalizer]
            out.append(
                (meta["name"], {"metadata": {"finalizers": rest, "resourceVersion": meta["resourceVersion"]}})
            )
    return out


async def sweep_once(
    api: KubeApi, memo: Any, watched: tuple[str, ...], finalizer: str, logger: logging.Logger
) -> list[tuple[str, str, str]]:
    """One pass; returns (namespace, plural, name) of what it released."""
    listing = await api.list(NAMESPACES, fieldSelector="status.phase=Terminating") or {}
    released = []
    for namespace in terminating(listing.get("items") or (), watched):
        for resource, attribute in KINDS:
            objects = await api.list(resource, namespace) or {}
            for name, patch in releases(objects.get("items") or (), finalizer):
                try:
                    if await api.merge_patch(resource, namespace, name, patch) is None:
                        continue  # gone already
                except ApiError as exc:
                    if exc.status == 409:
                        continue  # changed meanwhile: the next pass looks again
                    raise
                runtime = getattr(memo, attribute, None)
                if runtime is not None:
                    runtime.released.add((namespace, name))
                    wake = getattr(runtime, "wake", None)
                    if wake is not None:
                        wake(namespace, name)
                logger.info(
                    "namespace %s is being deleted: released %s %s (removed finalizer %s)",
                    namespace,
                    resource.plural,
                    name,
                    finalizer,
                )
                released.append((namespace, resource.plural, name))
    return released


async def sweep_forever(memo: Any, watched: tuple[str, ...], finalizer: str, logger: logging.Logger) -> None:
    api = await asyncio.to_thread(KubeApi.from_environment)
    try:
        while True:
            try:
                await sweep_once(api, memo, watched, finalizer, logger)
            except Exception as exc:  # noqa: BLE001 - API down, RBAC: logged, tried again
                logger.warning(
                    "releasing finalizers in terminating namespaces failed (retrying in %.0f s): %s",
                    SWEEP_SECONDS,
                    exc,
                )
            await asyncio.sleep(SWEEP_SECONDS)
    finally:
        await api.close()
