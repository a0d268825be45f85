"""Read a PEFT LoRA adapter directory (what `peft.save_pretrained` and our TrainJobs write) and check it
against the served base model before any of it reaches the device.

    adapter_config.json          peft_type LORA, r, lora_alpha, use_rslora, ...
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight [r, in], .lora_B.weight [out, r]

Every config key that changes the math is either computed (r, lora_alpha, use_rslora: scale alpha/r or
alpha/sqrt(r)) or, when set, refused by name (DoRA, lora biases, modules_to_save, rank/alpha patterns,
...). Keys that only steer training or bookkeeping are ignored. Errors are `AdapterError` (a ValueError)
naming the file and what is wrong: the server answers them with 400.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# keys that do not change what a trained adapter computes at inference
IGNORED_KEYS = frozenset(
    {
        "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
        "target_modules", "exclude_modules", "lora_dropout", "init_lora_weights", "layers_to_transform",
        "layers_pattern", "runtime_config", "ensure_weight_tying", "qalora_group_size", "megatron_core",
    }
)  # fmt: skip
COMPUTED_KEYS = frozenset({"peft_type", "r", "lora_alpha", "use_rslora", "bias"})

_TENSOR = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


class AdapterError(ValueError):
    """A bad adapter: the message names the file and the field."""


@dataclass(slots=True)
class LoRAAdapter:
    """One adapter in host memory. weights: HF module name -> (A [r, in], B [out, r])."""

    name: str
    path: str
    rank: int
    scaling: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def num_bytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def _truthy(value: Any) -> bool:
    return value not in (None, False, 0, "", [], {}, "none")


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise AdapterError(f"{file}: no such file (not a PEFT adapter directory)")
    try:
        config = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{file}: expected a JSON object")
    return config


def _refuse_unserved(file: Path, config: dict[str, Any]) -> None:
    """Every key that would change the math and is not computed here, when set, by name and value."""
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{file}: peft_type {config.get('peft_type')!r} is not served (only LORA)")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{file}: bias={config['bias']!r} is not supported (only 'none')")
    for key, value in config.items():
        if key not in IGNORED_KEYS and key not in COMPUTED_KEYS and _truthy(value):
            raise AdapterError(f"{file}: {key}={value!r} is not supported (it changes the adapter's math)")


def read_adapter_config(path: Path) -> tuple[int, float]:
    """(rank, scaling) of adapter_config.json; AdapterError naming the file and key otherwise."""
    file = path / CONFIG_FILE
    config = _read_json(file)
    _refuse_unserved(file, config)
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"{file}: r must be a positive integer, got {rank!r}")
    if alpha is None:
        alpha = 8  # PEFT's default
    if not isinstance(alpha, int | float):
        raise AdapterError(f"{file}: lora_alpha must be a number, got {alpha!r}")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, float(scaling)


def _read_tensors(file: Path) -> dict[str, dict[str, torch.Tensor]]:
    """HF module name -> {"A": lora_A, "B": lora_B} of the weights file."""
    if not file.is_file():
        other = sorted(p.name for p in file.parent.glob("adapter_model.*"))
        hint = f" (found {', '.join(other)}: only safetensors is read)" if other else ""
        raise AdapterError(f"{file}: no such file{hint}")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                m = _TENSOR.match(key)
                if m is None:
                    raise AdapterError(f"{file}: tensor {key!r} is not a LoRA A/B weight (not supported)")
                parts.setdefault(m["module"], {})[m["ab"]] = f.get_tensor(key)
    except AdapterError:
        raise
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise AdapterError(f"{file}: unreadable safetensors ({exc})") from None
    if not parts:
        raise AdapterError(f"{file}: holds no LoRA weights")
    return parts


def _checked_pair(file: Path, module: str, ab: dict[str, torch.Tensor], rank: int,
                  shapes: dict[str, tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    if set(ab) != {"A", "B"}:
        raise AdapterError(f"{file}: {module} has lora_{''.join(ab)} but not both lora_A and lora_B")
    if module not in shapes:
        raise AdapterError(
            f"{file}: {module} is not a linear of the base model that LoRA can target "
            f"(e.g. {', '.join(sorted(shapes)[:3])})"
        )
    a, b = ab["A"], ab["B"]
    in_features, out_features = shapes[module]
    if a.shape != (rank, in_features) or b.shape != (out_features, rank):
        raise AdapterError(
            f"{file}: {module} has lora_A {list(a.shape)} and lora_B {list(b.shape)}; the base model "
            f"needs [{rank}, {in_features}] and [{out_features}, {rank}] (r={rank})"
        )
    return a, b


def load_adapter(
    name: str, path: str | Path, shapes: dict[str, tuple[int, int]], max_rank: int
) -> LoRAAdapter:
    """Reads and checks the adapter at `path`. shapes: HF module name -> (in_features, out_features) of
    every base linear LoRA may target (`layers.wrap_lora_targets`); max_rank: the pool's R."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{path}: no such adapter directory")
    rank, scaling = read_adapter_config(path)
    if rank > max_rank:
        raise AdapterError(f"{path / CONFIG_FILE}: r={rank} exceeds --max-lora-rank {max_rank}")
    file = path / WEIGHTS_FILE
    parts = _read_tensors(file)
    weights = {module: _checked_pair(file, module, ab, rank, shapes) for module, ab in sorted(parts.items())}
    return LoRAAdapter(name, str(path), rank, scaling, weights)
