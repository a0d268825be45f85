"""LoRA adapters on a running InferenceService: a pure decision of what to load or unload on which replica.

No I/O: the controller (to be wired on the reconcile contract, issue #22) reads each ready replica's
`/v1/models` (an adapter's card has `parent` = the base model and `root` = its directory), calls
`plan` with the desired adapters (spec.adapters, TrainJob outputs resolved to paths), executes the
actions against the replica's `POST /v1/load_lora_adapter` / `/v1/unload_lora_adapter`, and writes
`status_entries` into status.adapters. Pods are never restarted for an adapter change: the pod template
does not depend on the adapter list, and a new replica gets every adapter from the same plan once it is
ready.

Rules, per replica:
- an adapter served but not desired is unloaded;
- a desired adapter not served is loaded;
- one served from another directory (spec changed, or a TrainJob re-ran into a new dir) is unloaded,
  then loaded again from the desired one (the engine gives the new weights a fresh prefix-cache key);
- the base model's own card is never touched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True, slots=True)
class AdapterAction:
    replica: str  # pod name
    verb: Literal["load", "unload"]
    name: str
    path: str | None = None  # load only: the adapter directory inside the pod


def served_adapters(models: Mapping[str, Any], base: str) -> dict[str, str]:
    """A replica's `/v1/models` body -> adapter name -> directory (cards whose parent is `base`)."""
    return {
        str(card["id"]): str(card.get("root") or "")
        for card in models.get("data") or []
        if isinstance(card, Mapping) and card.get("parent") == base
    }


def plan(desired: Mapping[str, str], served: Mapping[str, Mapping[str, str]]) -> list[AdapterAction]:
    """desired: adapter name -> directory; served: replica -> (adapter name -> directory) now.
    Unloads come before loads on each replica (a rename frees its slot first); replicas in name order."""
    actions: list[AdapterAction] = []
    for replica in sorted(served):
        now = served[replica]
        for name in sorted(now):
            if desired.get(name) != now[name]:
                actions.append(AdapterAction(replica, "unload", name))
        for name in sorted(desired):
            if now.get(name) != desired[name]:
                actions.append(AdapterAction(replica, "load", name, desired[name]))
    return actions


def status_entries(desired: Mapping[str, str], served: Mapping[str, Mapping[str, str]],
                   errors: Mapping[str, str]) -> list[dict[str, Any]]:  # fmt: skip
    """status.adapters: per desired adapter, the replicas serving it from the desired directory and the
    last error (errors: adapter name -> message of its latest failed load, e.g. the engine's 400)."""
    return [
        {
            "name": name,
            "path": path,
            "replicas": sorted(r for r, now in served.items() if now.get(name) == path),
            **({"lastError": errors[name]} if name in errors else {}),
        }
        for name, path in sorted(desired.items())
    ]
