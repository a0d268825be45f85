"""The trainer's configuration: the TrainJob's camelCase keys (operator/api/trainjob.py `TrainConfig`,
mounted at /etc/lmforge/train.json) parsed into small frozen dataclasses. Pure: no torch.

    {"model": "/models/llama", "dataset": {"source": "/data/train.jsonl", "format": "messages"},
     "method": "lora", "backend": "torchrun",
     "hyperparameters": {"learningRate": 1e-4, "maxSteps": 100, "seqLen": 2048, ...},
     "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targetModules": ["q_proj", "v_proj"]},
     "checkpoint": {"dir": "/ckpt", "everySteps": 500, "keepLast": 3, "resume": "auto"},
     "output": {"dir": "/out", "mergeAdapter": false}}
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PVC_ROOT_ENV = "LMFORGE_PVC_ROOT"
DEFAULT_PVC_ROOT = "/mnt/pvc"
# Keys the operator writes that the worker itself does not need.
_INFORMATIONAL_KEYS = ("jobName", "numNodes", "procsPerNode")
_ALIASES = {"activationCheckpointing": "gradientCheckpointing"}


class ConfigError(ValueError):
    """A config key is unknown, mistyped or out of range; the message names the key."""


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass(frozen=True, slots=True)
class DatasetConfig:
    source: str
    format: str | None = None  # "text" | "messages" | None: decided per row
    max_samples: int | None = None

    def __post_init__(self) -> None:
        _check(self.format in (None, "text", "messages"), "dataset.format", "must be text or messages")
        _check(self.max_samples is None or self.max_samples >= 1, "dataset.maxSamples", "must be >= 1")


@dataclass(frozen=True, slots=True)
class Hyperparameters:
    learning_rate: float = 1e-4
    epochs: int | None = None  # neither epochs nor max_steps: one epoch
    max_steps: int | None = None
    batch_size: int = 1  # sequences per rank per micro-step
    seq_len: int = 2048
    gradient_accumulation_steps: int = 1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"
    max_grad_norm: float = 1.0  # 0: no clipping
    precision: str = "bf16"  # autocast dtype on GPU; CPU always trains in fp32
    gradient_checkpointing: bool = False
    seed: int = 42
    log_every_steps: int = 10

    def __post_init__(self) -> None:
        h = "hyperparameters."
        _check(self.learning_rate > 0, h + "learningRate", "must be > 0")
        for name in ("epochs", "max_steps"):
            value = getattr(self, name)
            _check(value is None or value >= 1, h + _camel(name), "must be >= 1")
        for name in ("batch_size", "seq_len", "gradient_accumulation_steps", "log_every_steps"):
            _check(getattr(self, name) >= 1, h + _camel(name), "must be >= 1")
        _check(self.warmup_steps >= 0, h + "warmupSteps", "must be >= 0")
        _check(self.weight_decay >= 0, h + "weightDecay", "must be >= 0")
        _check(self.max_grad_norm >= 0, h + "maxGradNorm", "must be >= 0")
        _check(
            self.lr_scheduler in ("cosine", "linear", "constant"),
            h + "lrScheduler",
            "must be cosine, linear or constant",
        )
        _check(self.precision in ("bf16", "fp16", "fp32"), h + "precision", "must be bf16, fp16 or fp32")


@dataclass(frozen=True, slots=True)
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self) -> None:
        _check(self.r >= 1, "lora.r", "must be >= 1")
        _check(self.alpha >= 1, "lora.alpha", "must be >= 1")
        _check(0 <= self.dropout < 1, "lora.dropout", "must be in [0, 1)")
        _check(len(self.target_modules) >= 1, "lora.targetModules", "must name at least one module")


@dataclass(frozen=True, slots=True)
class CheckpointConfig:
    dir: str | None = None  # default: <output.dir>/checkpoints
    every_steps: int = 500
    keep_last: int = 3
    resume: str = "auto"

    def __post_init__(self) -> None:
        _check(self.every_steps >= 1, "checkpoint.everySteps", "must be >= 1")
        _check(self.keep_last >= 1, "checkpoint.keepLast", "must be >= 1")
        _check(self.resume in ("auto", "never"), "checkpoint.resume", "must be auto or never")


@dataclass(frozen=True, slots=True)
class OutputConfig:
    dir: str
    merge_adapter: bool = False  # lora: also write <dir>/merged


@dataclass(frozen=True, slots=True)
class TrainConfig:
    model: str
    dataset: DatasetConfig
    output: OutputConfig
    method: str = "lora"
    backend: str = "torchrun"
    zero_stage: int | None = None  # deepspeed only; default 2
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    lora: LoraConfig = field(default_factory=LoraConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        _check(self.method in ("full", "lora"), "method", "must be full or lora")
        _check(self.backend in ("torchrun", "deepspeed"), "backend", "must be torchrun or deepspeed")
        _check(self.zero_stage is None or self.zero_stage in (1, 2, 3), "zeroStage", "must be 1, 2 or 3")
        _check(
            self.zero_stage is None or self.backend == "deepspeed", "zeroStage", "needs backend: deepspeed"
        )
        _check(
            not self.output.merge_adapter or self.method == "lora",
            "output.mergeAdapter",
            "needs method: lora",
        )

    # Local paths (URIs resolved); the operator mounts pvc:// claims under $LMFORGE_PVC_ROOT.
    @property
    def model_path(self) -> Path:
        return resolve_path(self.model, "model")

    @property
    def dataset_path(self) -> Path:
        return resolve_path(self.dataset.source, "dataset.source")

    @property
    def output_dir(self) -> Path:
        return resolve_path(self.output.dir, "output.dir")

    @property
    def checkpoint_uri(self) -> str | None:
        """Where checkpoints are uploaded to (s3://), or None when they stay on a volume. Default
        for an s3:// output: <output.dir>/checkpoints."""
        uri = self.checkpoint.dir
        if uri is None and self.output.dir.startswith("s3://"):
            uri = self.output.dir.rstrip("/") + "/checkpoints"
        return uri if uri is not None and uri.startswith("s3://") else None

    @property
    def output_uri(self) -> str | None:
        """Where the output is uploaded to (s3://), or None."""
        return self.output.dir if self.output.dir.startswith("s3://") else None

    @property
    def checkpoint_dir(self) -> Path:
        if self.checkpoint_uri is not None:
            return resolve_path(self.checkpoint_uri, "checkpoint.dir")
        if self.checkpoint.dir is None:
            return self.output_dir / "checkpoints"
        return resolve_path(self.checkpoint.dir, "checkpoint.dir")

    def to_dict(self) -> dict[str, Any]:
        """camelCase dict that `config_from_dict` reads back (written next to checkpoints)."""

        def convert(value: Any) -> Any:
            if dataclasses.is_dataclass(value):
                return {_camel(f.name): convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
            return list(value) if isinstance(value, tuple) else value

        return convert(self)


# Keys whose hf://org/name or s3:// source the worker downloads itself (lmforge.runtime.hub,
# lmforge.runtime.storage), and the repo type.
HUB_KEYS = {"model": "model", "dataset.source": "dataset"}
# Keys the worker writes: an s3:// one is written to a node-local staging directory and uploaded
# by rank 0 (outputs when training ends, each checkpoint once committed), its manifest last.
UPLOAD_KEYS = ("output.dir", "checkpoint.dir")


def resolve_path(uri: str, key: str) -> Path:
    """`/abs`, `file:///abs` and `hostPath:///abs` -> /abs; `pvc://claim/sub` -> $LMFORGE_PVC_ROOT/claim/sub;
    `hf://org/name` (model and dataset.source only) -> its snapshot, downloaded on first use (once per
    process; the local ranks of a node share one download, see lmforge.runtime.hub); `s3://bucket/prefix`
    -> for model and dataset.source its local copy (downloaded once per node), for output.dir and
    checkpoint.dir the staging directory that rank 0 uploads from (lmforge.runtime.storage.staging)."""
    if uri.startswith(("hostPath://", "file://")):
        return Path(uri.split("://", 1)[1])
    if uri.startswith("pvc://"):
        return Path(os.environ.get(PVC_ROOT_ENV, DEFAULT_PVC_ROOT)) / uri[len("pvc://") :]
    if uri.startswith("hf://") and key in HUB_KEYS:
        return _hub_snapshot(uri, HUB_KEYS[key], key)
    if uri.startswith("s3://") and (key in HUB_KEYS or key in UPLOAD_KEYS):
        return _s3_location(uri, key)
    _check(
        "://" not in uri,
        key,
        f"{uri!r}: the worker reads local paths, hostPath://, pvc://"
        + (", s3://" if key in UPLOAD_KEYS else "")
        + (", s3:// or hf://" if key in HUB_KEYS else "")
        + " only",
    )
    return Path(uri)


_hub_paths: dict[tuple[str, str, str], Path] = {}


def _hub_snapshot(uri: str, repo_type: str, key: str) -> Path:
    """Downloads once per process (the properties above are read many times); raises HubError."""
    from lmforge.runtime import hub

    memo = (uri, repo_type, str(hub.cache_dir()))
    if memo not in _hub_paths:
        _hub_paths[memo] = hub.resolve(uri, repo_type=repo_type, what=key)
    return _hub_paths[memo]


def _s3_location(uri: str, key: str) -> Path:
    """Inputs: downloaded once per process (StorageError, prefixed with the key, when not). Outputs:
    the staging directory."""
    from lmforge.runtime.storage import staging
    from lmforge.runtime.storage.s3 import StorageError

    if key in UPLOAD_KEYS:
        return staging.staging_dir(uri)
    memo = (uri, "s3", str(staging.staging_dir(uri)))
    if memo not in _hub_paths:
        try:
            _hub_paths[memo] = staging.local_input(uri)
        except StorageError as exc:
            raise StorageError(f"{key}: {exc}") from exc
    return _hub_paths[memo]


def _section(cls: type, data: Any, where: str) -> Any:
    if dataclasses.is_dataclass(data):
        return data
    _check(isinstance(data, dict), where, f"must be a mapping, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        key = _ALIASES.get(key, key)
        name = _snake(key)
        _check(
            name in names,
            f"{where}.{key}",
            f"unknown key; expected one of {sorted(_camel(n) for n in names)}",
        )
        kwargs[name] = _coerce(value, str(names[name].type), f"{where}.{key}")  # a str: future annotations
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required key is missing
        raise ConfigError(f"{where}: {exc}") from None


def _coerce(value: Any, annotation: str, key: str) -> Any:
    """Type checks for the scalar annotations used above (they are strings: `from __future__`)."""
    if value is None:
        _check("None" in annotation, key, "must not be null")
        return None
    if annotation.startswith("tuple"):
        _check(
            isinstance(value, list | tuple) and all(isinstance(v, str) for v in value),
            key,
            "must be a list of strings",
        )
        return tuple(value)
    if annotation.startswith("bool"):
        _check(isinstance(value, bool), key, f"must be true or false, got {value!r}")
    elif annotation.startswith("int"):
        _check(
            isinstance(value, int) and not isinstance(value, bool), key, f"must be an integer, got {value!r}"
        )
    elif annotation.startswith("float"):
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _check(
            isinstance(value, int | float) and not isinstance(value, bool),
            key,
            f"must be a number, got {value!r}",
        )
        return float(value)
    elif annotation.startswith("str"):
        _check(isinstance(value, str), key, f"must be a string, got {value!r}")
    return value


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Parses the camelCase dict; unknown keys are errors (a typo must not silently train)."""
    data = {k: v for k, v in data.items() if k not in _INFORMATIONAL_KEYS}
    for key in ("model", "dataset", "output"):
        _check(key in data and data[key] is not None, key, "is required")
    if isinstance(data["dataset"], str):
        data["dataset"] = {"source": data["dataset"]}
    sections = {
        "dataset": DatasetConfig,
        "output": OutputConfig,
        "hyperparameters": Hyperparameters,
        "lora": LoraConfig,
        "checkpoint": CheckpointConfig,
    }
    for key, cls in sections.items():
        if data.get(key) is not None:
            data[key] = _section(cls, data[key], key)
        else:
            data.pop(key, None)
    return _section(TrainConfig, data, "config")


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else in `overrides` replaces."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        elif isinstance(value, dict) and isinstance(out.get(key), str) and key == "dataset":
            out[key] = merge({"source": out[key]}, value)
        else:
            out[key] = value
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    _check(isinstance(data, dict), str(path), "must hold a mapping")
    return data


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The file's keys (if any) with CLI `overrides` on top."""
    data = load_config_file(path) if path else {}
    return config_from_dict(merge(data, overrides or {}))
