"""LoRAManager: which adapters exist, which sit in host memory, which occupy the device slots.

    registry   name -> id (a fresh int per registration: a re-loaded adapter never shares KV blocks with
               its earlier weights, see BlockManager's adapter-keyed hashes) and its directory
    CPU cache  the last C adapters used, LRU (OrderedDict); an evicted one is re-read from disk on demand
    GPU slots  K slots of the LoRALinear stacks; `activate` puts a step's adapters in slots between
               forwards, evicting the least recently used slot whose adapter no running sequence uses
               (the scheduler admits at most K distinct adapters among running sequences, so one exists)

Everything runs on the engine thread between steps: a load is a host->device copy of a few MB.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmforge.kernels.backend import Ops
from lmforge.runtime.lora.adapter import AdapterError, LoRAAdapter, load_adapter
from lmforge.runtime.lora.config import LoRAConfig
from lmforge.runtime.lora.layers import LoRAContext, LoRALinear, Target, wrap_lora_targets

BASE_ID = 0  # Sequence.lora_id of a base-model request


@dataclass(frozen=True, slots=True)
class Registered:
    lora_id: int
    name: str
    path: str


class LoRAManager:
    def __init__(self, model: nn.Module, config: LoRAConfig, *, device: torch.device, dtype: torch.dtype,
                 ops: Ops):  # fmt: skip
        self.config = config
        self.ctx = LoRAContext(config.max_loras, device, ops)
        self.device = device
        self.targets: dict[str, Target] = wrap_lora_targets(
            model, self.ctx, config.max_loras, config.max_lora_rank, dtype, device
        )
        if not self.targets:
            raise ValueError(f"{type(model).__name__} has no linear layers LoRA can target")
        self.layers = list(dict.fromkeys(t.layer for t in self.targets.values()))
        self.shapes = {name: (t.in_features, t.out_features) for name, t in self.targets.items()}
        self.by_name: dict[str, Registered] = {}
        self.by_id: dict[
            int, Registered
        ] = {}  # every id ever registered (a running request may outlive unload)
        self.cpu_cache: OrderedDict[int, LoRAAdapter] = OrderedDict()
        self.slot_ids: list[int | None] = [None] * config.max_loras  # lora id in each slot
        self.slot_lru: OrderedDict[int, None] = OrderedDict((s, None) for s in range(config.max_loras))
        self.pinned: Callable[[], set[int]] = set  # ids used by running sequences (set by the engine)
        self._ids = itertools.count(1)
        self.num_slot_loads = 0

    # --- registry -------------------------------------------------------------------------------------
    def add(self, name: str, path: str | Path) -> int:
        """Registers (and reads, so a bad adapter fails here) an adapter; AdapterError naming the file, or
        ValueError when the name is taken."""
        if name in self.by_name:
            raise ValueError(f"a LoRA adapter named {name!r} is already loaded")
        adapter = load_adapter(name, path, self.shapes, self.config.max_lora_rank)
        entry = Registered(next(self._ids), name, str(path))
        self.by_name[name] = entry
        self.by_id[entry.lora_id] = entry
        self._cache(entry.lora_id, adapter)
        return entry.lora_id

    def remove(self, name: str) -> bool:
        """Unregisters; requests already running with it finish with it (its slot stays pinned by them)."""
        entry = self.by_name.pop(name, None)
        if entry is None:
            return False
        self.cpu_cache.pop(entry.lora_id, None)
        return True

    def id_of(self, name: str) -> int | None:
        entry = self.by_name.get(name)
        return None if entry is None else entry.lora_id

    def name_of(self, lora_id: int) -> str:
        return self.by_id[lora_id].name

    def names(self) -> list[str]:
        return list(self.by_name)

    # --- caches ---------------------------------------------------------------------------------------
    def _cache(self, lora_id: int, adapter: LoRAAdapter) -> None:
        self.cpu_cache[lora_id] = adapter
        self.cpu_cache.move_to_end(lora_id)
        while len(self.cpu_cache) > self.config.cpu_capacity:
            self.cpu_cache.popitem(last=False)

    def _host_copy(self, lora_id: int) -> LoRAAdapter:
        adapter = self.cpu_cache.get(lora_id)
        if adapter is None:  # evicted from the CPU cache: read it again
            entry = self.by_id[lora_id]
            adapter = load_adapter(entry.name, entry.path, self.shapes, self.config.max_lora_rank)
        self._cache(lora_id, adapter)
        return adapter

    def slot_of(self, lora_id: int) -> int | None:
        try:
            return self.slot_ids.index(lora_id)
        except ValueError:
            return None

    def activate(self, lora_ids: Iterable[int]) -> dict[int, int]:
        """Puts every adapter of a step in a device slot; lora id -> slot. Never evicts an adapter of this
        step or of a running sequence; RuntimeError if the step needs more than K (a scheduler bug)."""
        wanted = [i for i in dict.fromkeys(lora_ids) if i != BASE_ID]
        keep = set(wanted) | self.pinned()
        mapping = {}
        for lora_id in wanted:
            slot = self.slot_of(lora_id)
            if slot is None:
                slot = self._free_slot(keep)
                self._load_slot(slot, lora_id)
            self.slot_lru.move_to_end(slot)
            mapping[lora_id] = slot
        return mapping

    def _free_slot(self, keep: set[int]) -> int:
        for slot in self.slot_lru:  # least recently used first; empty slots are at the front
            if self.slot_ids[slot] is None or self.slot_ids[slot] not in keep:
                return slot
        raise RuntimeError(f"all {self.config.max_loras} LoRA slots hold adapters in use")

    def _load_slot(self, slot: int, lora_id: int) -> None:
        adapter = self._host_copy(lora_id)
        for layer in self.layers:
            layer.clear_slot(slot)
        for module, (a, b) in adapter.weights.items():
            target = self.targets[module]
            target.layer.set_shard(slot, target.shard, a, b)
        self.ctx.scales[slot] = adapter.scaling
        self.slot_ids[slot] = lora_id
        self.num_slot_loads += 1

    # --- one step -------------------------------------------------------------------------------------
    def set_batch(self, token_lora_ids: list[int]) -> bool:
        """Per-token adapter ids of the next forward -> the context every LoRALinear reads. Returns whether
        any token has an adapter."""
        if not any(token_lora_ids):
            self.ctx.active = False
            return False
        mapping = self.activate(token_lora_ids)
        slots = [-1 if i == BASE_ID else mapping[i] for i in token_lora_ids]
        self.ctx.token_slots = torch.tensor(slots, dtype=torch.int32, device=self.device)
        self.ctx.active = True
        return True

    def clear_batch(self) -> None:
        self.ctx.active = False


__all__ = ["BASE_ID", "AdapterError", "LoRALinear", "LoRAManager"]
