"""LoRARequest: the adapter a request runs with (vLLM's name and fields)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LoRARequest:
    """lora_name: the adapter's served name (what clients put in `model`). lora_path: its PEFT directory;
    only needed for an adapter the engine does not know yet (then it is registered on first use)."""

    lora_name: str
    lora_path: str | None = None
