"""Tiny checkpoints quantized once per session with every method (a few seconds in all).

hidden 128 / intermediate 256 so that group sizes 32..128 divide every input size (format gotcha 2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from lmforge.runtime.models.tiny import save_tiny_model
from lmforge.runtime.quantize import main

torch.set_num_threads(1)  # 2 busy cores: one thread avoids contention

SHAPE = dict(hidden_size=128, intermediate_size=256, initializer_range=0.1)
# method -> (tiny arch, extra model kwargs, extra CLI flags): each run covers a different corner.
RUNS: dict[str, tuple[str, dict[str, Any], list[str]]] = {
    "w8a16": ("llama32", {}, []),  # tied embeddings, per-channel int8
    "w4a16-rtn": ("llama", {}, []),  # default group 128
    "w4a16-gptq": ("llama", {}, ["--group-size", "64"]),  # act-order (static) by default
    "w4a16-awq": ("qwen2", {"num_kv_heads": 4}, ["--group-size", "32"]),  # qkv bias, v->o fold (no GQA)
    "fp8": ("llama", {}, []),
}
METHODS = tuple(RUNS)


@dataclass(frozen=True)
class Quantized:
    method: str
    source: Path
    output: Path
    report: dict[str, Any]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


CALIBRATION_TEXTS = [
    f"Document {i}: the operator reconciles job {i} and writes its status; a paged cache holds {i * 7} blocks. "
    "Continuous batching mixes prefill chunks with decode steps so that the accelerator never idles."
    for i in range(40)
]


@pytest.fixture(scope="session")
def calibration_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("calib") / "calib.jsonl", CALIBRATION_TEXTS)


@pytest.fixture(scope="session")
def sources(tmp_path_factory) -> dict[tuple[str, int], Path]:
    root = tmp_path_factory.mktemp("quant-src")
    out = {}
    for arch, extra, _ in RUNS.values():
        key = (arch, extra.get("num_kv_heads", 2))
        if key not in out:
            out[key] = save_tiny_model(root / f"{arch}-kv{key[1]}", arch, **SHAPE, **extra)
    return out


@pytest.fixture(scope="session")
def quantized(tmp_path_factory, sources, calibration_file) -> dict[str, Quantized]:
    root = tmp_path_factory.mktemp("quant-out")
    out = {}
    for method, (arch, extra, flags) in RUNS.items():
        source = sources[(arch, extra.get("num_kv_heads", 2))]
        output = root / method
        argv = [
            "--model",
            str(source),
            "--method",
            method,
            "--output",
            str(output),
            "--calibration",
            str(calibration_file),
            "--samples",
            "8",
            "--seq-len",
            "64",
            "--eval-samples",
            "4",
            "--eval-seq-len",
            "48",
            *flags,
        ]
        assert main(argv) == 0
        report = json.loads((output / "quantization_report.json").read_text())
        out[method] = Quantized(method, source, output, report)
    return out
