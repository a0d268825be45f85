"""What to quantize and how: the options of one run, and the compressed-tensors `quantization_config`
written into config.json (shared notes quant-format.md, followed field by field). No torch here.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from lmforge.runtime.quantize_args import CALIBRATED_METHODS, METHODS

COMPRESSED_TENSORS_VERSION = "0.20.0"  # the library version the format notes were verified against
ALWAYS_IGNORED = ("lm_head",)  # "Linear" also matches lm_head: it must be listed (format gotcha 4)
DEFAULT_W4_GROUP = 128


class QuantizeError(ValueError):
    """A problem with the request (bad options, missing calibration, incompatible model): exit 2."""


@dataclass(slots=True)
class QuantizeOptions:
    model: str
    method: str
    output: str
    group_size: int | None = None  # None: the method's default
    ignore: list[str] = field(default_factory=list)
    calibration: str | None = None
    samples: int = 128
    seq_len: int = 512
    act_order: bool = True
    damp: float = 0.01
    eval_dataset: str | None = None
    eval_samples: int = 8
    eval_seq_len: int = 128
    eval: bool = True
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise QuantizeError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method in CALIBRATED_METHODS and not self.calibration:
            raise QuantizeError(
                f"{self.method} needs calibration data: pass --calibration FILE.jsonl (JSON Lines with a "
                '"text" field per line; --samples and --seq-len size it). Without data use w4a16-rtn.'
            )
        if self.method == "fp8" and self.group_size not in (None, -1):
            raise QuantizeError("fp8 uses one scale per output channel: --group-size does not apply")
        if (
            self.method.startswith("w")
            and self.group_size is not None
            and self.group_size != -1
            and self.group_size < 1
        ):
            raise QuantizeError(f"group size must be -1 or positive, got {self.group_size}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> QuantizeOptions:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in vars(args).items() if k in names})

    @property
    def bits(self) -> int:
        return 4 if self.method.startswith("w4") else 8

    @property
    def effective_group_size(self) -> int:
        """-1: one scale per output channel."""
        if self.group_size is not None:
            return self.group_size
        return DEFAULT_W4_GROUP if self.method.startswith("w4") else -1

    @property
    def ignore_list(self) -> list[str]:
        return list(dict.fromkeys([*ALWAYS_IGNORED, *self.ignore]))


# --- the quantization_config ------------------------------------------------------------------------


def weights_args(method: str, group_size: int) -> dict[str, Any]:
    if method == "fp8":
        return {
            "num_bits": 8,
            "type": "float",
            "symmetric": True,
            "strategy": "channel",
            "group_size": None,
            "dynamic": False,
        }
    bits = 4 if method.startswith("w4") else 8
    grouped = group_size > 0
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": True,
        "strategy": "group" if grouped else "channel",
        "group_size": group_size if grouped else None,
        "dynamic": False,
    }


FP8_TOKEN_ACTIVATIONS = {
    "num_bits": 8,
    "type": "float",
    "symmetric": True,
    "strategy": "token",
    "dynamic": True,
    "group_size": None,
}


def quant_format(method: str) -> str:
    return "float-quantized" if method == "fp8" else "pack-quantized"


def quantization_config(method: str, group_size: int, ignore: Iterable[str]) -> dict[str, Any]:
    """The `quantization_config` block of config.json for one scheme applied to every Linear."""
    fmt = quant_format(method)
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",  # anything else: transformers silently random-inits (gotcha 1)
        "version": COMPRESSED_TENSORS_VERSION,
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "format": fmt,
                "weights": weights_args(method, group_size),
                "input_activations": dict(FP8_TOKEN_ACTIVATIONS) if method == "fp8" else None,
                "output_activations": None,
            }
        },
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }


# --- module matching (compressed-tensors semantics: exact name, re:<regex> with re.match, or class) ---


def matches(name: str, patterns: Iterable[str], class_names: Iterable[str] = ()) -> bool:
    classes = set(class_names)
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif pattern == name or pattern in classes:
            return True
    return False
