"""Fixtures for the trainer tests: a tiny random Llama + tokenizer (chat template included) and
small learnable JSONL datasets. Everything is built on the fly; no hub downloads."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

SENTENCES = ["the cat sat on the mat. ", "one two three four five. ", "abc abc abc abc. "]


def build_tokenizer():
    """The tiny models' tokenizer: byte-level BPE with a chat template."""
    from lmforge.runtime.models.tiny import build_tokenizer as build

    return build()


def save_tiny_llama(path: Path, seed: int = 0) -> Path:
    """A random-init Llama (hidden 64, 2 layers) + tokenizer, written in HF layout. A wider init
    (0.1) than HF's 0.02 gives the frozen lm_head enough range for LoRA to lower the loss fast."""
    from lmforge.runtime.models.tiny import save_tiny_model

    return save_tiny_model(path, "llama", seed=seed, initializer_range=0.1)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def text_rows(n: int) -> list[dict]:
    """Learnable (repeated sentences, counting) yet different rows, so batches are distinguishable."""
    return [
        {"text": SENTENCES[i % 3] * (1 + i % 2) + " ".join(str(i + k) for k in range(4 + i % 5))}
        for i in range(n)
    ]


def chat_rows(n: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"say {SENTENCES[i % 3].strip()}"},
                {"role": "assistant", "content": SENTENCES[i % 3].strip()},
            ]
        }
        for i in range(n)
    ]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def text_dataset(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", text_rows(64))


@pytest.fixture(scope="session")
def chat_dataset(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("chat") / "chat.jsonl", chat_rows(48))


def base_config(model_dir: Path, dataset_path: Path, out_dir: Path, **overrides) -> dict:
    """A small, fast config dict in the file's camelCase layout; `overrides` merge section by section."""
    config = {
        "model": str(model_dir),
        "dataset": {"source": str(dataset_path)},
        "method": "full",
        "hyperparameters": {
            "learningRate": 3e-3,
            "maxSteps": 12,
            "batchSize": 2,
            "seqLen": 64,
            "warmupSteps": 2,
            "seed": 7,
            "logEverySteps": 4,
        },
        "checkpoint": {"everySteps": 4, "keepLast": 2},
        "output": {"dir": str(out_dir)},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def loss_drop(losses: dict[int, float]) -> float:
    """Mean loss of the first three steps minus that of the last three (batches differ per step)."""
    steps = sorted(losses)
    return (sum(losses[s] for s in steps[:3]) - sum(losses[s] for s in steps[-3:])) / 3


def read_losses(out: Path) -> dict[int, float]:
    """step -> loss from train_log.jsonl (the last record of a step wins: resumed runs repeat steps)."""
    losses = {}
    for line in (out / "train_log.jsonl").read_text().splitlines():
        record = json.loads(line)
        losses[record["step"]] = record["loss"]
    return losses


def subprocess_env() -> dict[str, str]:
    """Environment of worker subprocesses: no inherited rank variables or cluster, one thread per
    rank (2 ranks on 2 cores), and a bytecode cache so the second worker imports torch faster."""
    drop = (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "KUBERNETES_SERVICE_HOST",
        "PYTHONDONTWRITEBYTECODE",
    )
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("PET_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("PYTHONPYCACHEPREFIX", str(Path.home() / ".cache" / "lmforge" / "pycache"))
    return env


PYTHON = sys.executable


@pytest.fixture(scope="session")
def helpers():
    """This module, so tests can call its helpers (conftest is not importable by name)."""
    return sys.modules[__name__]
