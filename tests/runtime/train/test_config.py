"""Config contract: the TrainJob's camelCase keys (as the operator writes /etc/lmforge/train.json),
CLI overrides on top, clear errors for typos. Pure: no torch."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from lmforge.runtime.train.config import (
    ConfigError,
    TrainConfig,
    config_from_dict,
    load_config,
    merge,
    resolve_path,
)
from lmforge.runtime.train_args import add_train_arguments, overrides_from_args

MINIMAL = {"model": "/models/llama", "dataset": "/data/train.jsonl", "output": {"dir": "/out"}}


def parse_flags(argv: list[str]) -> dict:
    return overrides_from_args(add_train_arguments(argparse.ArgumentParser()).parse_args(argv))


def test_defaults_match_the_crd() -> None:
    cfg = config_from_dict(MINIMAL)
    hp = cfg.hyperparameters
    assert (cfg.method, cfg.backend, cfg.zero_stage) == ("lora", "torchrun", None)
    assert (hp.learning_rate, hp.batch_size, hp.seq_len, hp.lr_scheduler, hp.max_grad_norm, hp.seed) == (
        1e-4,
        1,
        2048,
        "cosine",
        1.0,
        42,
    )
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (
        16,
        32,
        ("q_proj", "k_proj", "v_proj", "o_proj"),
    )
    assert (cfg.checkpoint.every_steps, cfg.checkpoint.keep_last, cfg.checkpoint.resume) == (500, 3, "auto")
    assert cfg.checkpoint_dir == Path("/out/checkpoints")
    assert cfg.dataset.source == "/data/train.jsonl" and cfg.dataset.format is None


def test_operator_train_json_parses() -> None:
    """What operator/api/trainjob.py `TrainConfig` dumps is exactly what the worker reads."""
    api = pytest.importorskip("lmforge.operator.api.trainjob")
    spec = api.TrainConfig(
        job_name="ft",
        model="pvc://models/llama",
        dataset=api.Dataset(source="hostPath:///data/chat.jsonl"),
        method="lora",
        lora=api.LoRA(r=8, target_modules=["q_proj", "v_proj"]),
        backend="deepspeed",
        zero_stage=3,
        num_nodes=2,
        procs_per_node=4,
        hyperparameters=api.Hyperparameters(max_steps=100, warmup_steps=10, gradient_checkpointing=True),
        checkpoint=api.Checkpoint(dir="/ckpt", every_steps=50),
        output=api.Output(dir="/out", merge_adapter=True),
    )
    cfg = config_from_dict(json.loads(spec.model_dump_json(by_alias=True)))
    assert cfg.lora.r == 8 and cfg.lora.target_modules == ("q_proj", "v_proj")
    assert (cfg.backend, cfg.zero_stage, cfg.output.merge_adapter) == ("deepspeed", 3, True)
    assert (cfg.hyperparameters.max_steps, cfg.hyperparameters.gradient_checkpointing) == (100, True)
    assert cfg.dataset.format == "messages" and cfg.dataset_path == Path("/data/chat.jsonl")
    assert cfg.checkpoint_dir == Path("/ckpt") and cfg.checkpoint.every_steps == 50


def test_file_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text(
        "model: /m\ndataset: {source: /d.jsonl, format: text}\noutput: {dir: /o}\nmethod: full\n"
        "hyperparameters: {learningRate: 1e-4, maxSteps: 10, activationCheckpointing: true}\n"
    )
    cfg = load_config(
        path,
        parse_flags(
            [
                "--max-steps",
                "20",
                "--lr",
                "3e-5",
                "--dataset",
                "/e.jsonl",
                "--no-activation-checkpointing",
                "--lora-target-modules",
                "q_proj",
            ]
        ),
    )
    hp = cfg.hyperparameters
    assert (hp.max_steps, hp.learning_rate, hp.gradient_checkpointing) == (20, 3e-5, False)
    assert (cfg.dataset.source, cfg.dataset.format, cfg.method) == ("/e.jsonl", "text", "full")
    assert cfg.lora.target_modules == ("q_proj",)


def test_flags_alone() -> None:
    cfg = load_config(
        None,
        parse_flags(
            [
                "--model",
                "/m",
                "--dataset",
                "/d",
                "--output-dir",
                "/o",
                "--method",
                "full",
                "--backend",
                "deepspeed",
                "--zero-stage",
                "3",
                "--resume",
                "never",
            ]
        ),
    )
    assert (cfg.method, cfg.backend, cfg.zero_stage, cfg.checkpoint.resume) == (
        "full",
        "deepspeed",
        3,
        "never",
    )


def test_to_dict_round_trips() -> None:
    cfg = config_from_dict(merge(MINIMAL, {"hyperparameters": {"maxSteps": 3}, "lora": {"r": 4}}))
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"hyperparameters": {"learningrate": 1e-4}}, "hyperparameters.learningrate: unknown key"),
        ({"hyperparameters": {"maxSteps": "ten"}}, "hyperparameters.maxSteps: must be an integer"),
        ({"hyperparameters": {"lrScheduler": "step"}}, "hyperparameters.lrScheduler: must be cosine"),
        ({"hyperparameters": {"batchSize": 0}}, "hyperparameters.batchSize: must be >= 1"),
        ({"checkpoint": {"resume": "always"}}, "checkpoint.resume: must be auto or never"),
        (
            {"method": "full", "output": {"dir": "/o", "mergeAdapter": True}},
            "output.mergeAdapter: needs method: lora",
        ),
        ({"zeroStage": 2}, "zeroStage: needs backend: deepspeed"),
        ({"lora": {"targetModules": "q_proj"}}, "lora.targetModules: must be a list of strings"),
        ({"model": None}, "model: is required"),
        ({"color": "blue"}, "config.color: unknown key"),
    ],
    ids=[
        "typo",
        "type",
        "scheduler",
        "range",
        "resume",
        "merge-full",
        "zero-torchrun",
        "targets",
        "no-model",
        "unknown-top",
    ],
)
def test_bad_config_names_the_key(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        config_from_dict(merge(MINIMAL, overrides))


def test_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMFORGE_PVC_ROOT", "/mnt/claims")
    assert resolve_path("pvc://models/llama/3b", "model") == Path("/mnt/claims/models/llama/3b")
    assert resolve_path("hostPath:///data/x.jsonl", "dataset") == Path("/data/x.jsonl")
    assert resolve_path("/abs/path", "model") == Path("/abs/path")
    with pytest.raises(ConfigError, match="output.dir: 'hf://org/name'"):  # hf:// is read-only: model/dataset
        resolve_path("hf://org/name", "output.dir")
    monkeypatch.setenv("LMFORGE_STAGING_DIR", "/stage")
    from lmforge.runtime.storage.cache import key

    # s3:// outputs are written to the node's staging directory (rank 0 uploads them); inputs are
    # downloaded (tests/runtime/train/test_train_s3.py)
    assert resolve_path("s3://bucket/out", "output.dir") == Path("/stage") / key("s3://bucket/out")
    with pytest.raises(ConfigError, match="hyperparameters.x: 's3://bucket/x': the worker reads local paths"):
        resolve_path("s3://bucket/x", "hyperparameters.x")
    assert isinstance(config_from_dict(MINIMAL), TrainConfig)
