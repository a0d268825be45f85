"""DeepSpeed backend: the generated config (pure), and LoRA under ZeRO-2 in-process (world size 1,
gloo): same losses and adapter as the torch engine, crash + resume reproduces the curve. The
2-rank ZeRO-3 run is in test_distributed.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lmforge.runtime.train.config import config_from_dict
from lmforge.runtime.train.engines import deepspeed_config
from lmforge.runtime.train.loop import train

MINIMAL = {"model": "/m", "dataset": "/d", "output": {"dir": "/o"}, "backend": "deepspeed"}


@pytest.mark.parametrize(
    "stage, device, precision, expected",
    [
        (None, "cpu", "bf16", {"zero_optimization": {"stage": 2, "overlap_comm": False}}),
        (
            3,
            "cuda",
            "bf16",
            {
                "zero_optimization": {
                    "stage": 3,
                    "overlap_comm": True,
                    "stage3_gather_16bit_weights_on_model_save": True,
                },
                "bf16": {"enabled": True},
            },
        ),
        (
            1,
            "cuda",
            "fp16",
            {"zero_optimization": {"stage": 1, "overlap_comm": True}, "fp16": {"enabled": True}},
        ),
    ],
    ids=["cpu-default", "zero3-bf16", "zero1-fp16"],
)
def test_deepspeed_config(stage, device, precision, expected) -> None:
    cfg = config_from_dict(
        {
            **MINIMAL,
            "zeroStage": stage,
            "hyperparameters": {
                "batchSize": 4,
                "gradientAccumulationSteps": 8,
                "learningRate": 2e-4,
                "weightDecay": 0.1,
                "maxGradNorm": 0.5,
                "precision": precision,
            },
        }
    )
    config = deepspeed_config(cfg, world_size=16, device_type=device)
    assert (
        config["train_micro_batch_size_per_gpu"],
        config["gradient_accumulation_steps"],
        config["train_batch_size"],
        config["gradient_clipping"],
    ) == (4, 8, 512, 0.5)
    assert config["zero_optimization"] == expected["zero_optimization"]
    params = config["optimizer"]["params"]
    assert config["optimizer"]["type"] == "AdamW"
    assert (params["lr"], params["weight_decay"], params["torch_adam"]) == (2e-4, 0.1, True)
    for key in ("bf16", "fp16"):
        assert config.get(key) == expected.get(key)


@pytest.fixture(scope="module")
def clean_env():
    """DeepSpeed's init sets MASTER_ADDR/PORT, RANK, ... and a process group in this process (the
    trainer keeps it for DeepSpeed's cached groups); undo both for the tests that follow."""
    saved = dict(os.environ)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def test_lora_zero2_matches_torch_and_resumes(
    clean_env, helpers, tiny_model, chat_dataset, tmp_path: Path
) -> None:
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    def config(out: Path, backend: str) -> object:
        return config_from_dict(
            helpers.base_config(
                tiny_model,
                chat_dataset,
                out,
                method="lora",
                backend=backend,
                zeroStage=2 if backend == "deepspeed" else None,
                hyperparameters={"maxSteps": 8, "learningRate": 1e-2, "gradientAccumulationSteps": 2},
                lora={"r": 8, "alpha": 16, "dropout": 0.1},
            )
        )

    assert train(config(tmp_path / "torch", "torchrun")) == 0
    assert train(config(tmp_path / "ds", "deepspeed")) == 0
    reference, losses = helpers.read_losses(tmp_path / "torch"), helpers.read_losses(tmp_path / "ds")
    for step in range(1, 9):
        assert losses[step] == pytest.approx(reference[step], abs=1e-5), f"step {step}"
    adapter_ref = load_file(tmp_path / "torch" / "adapter_model.safetensors")
    adapter = load_file(tmp_path / "ds" / "adapter_model.safetensors")
    assert adapter.keys() == adapter_ref.keys() and len(adapter) == 16  # 2 layers x q/k/v/o x A/B
    for name, tensor in adapter.items():
        assert torch.allclose(tensor, adapter_ref[name], atol=1e-5), name

    class Crash(Exception):
        pass

    def crash_at_6(step: int, loss: float) -> None:
        if step == 6:
            raise Crash

    resumed = tmp_path / "resumed"
    with pytest.raises(Crash):
        train(config(resumed, "deepspeed"), on_step=crash_at_6)
    assert train(config(resumed, "deepspeed")) == 0
    again = helpers.read_losses(resumed)
    for step in range(1, 9):
        assert again[step] == pytest.approx(losses[step], abs=1e-5), f"step {step}"
