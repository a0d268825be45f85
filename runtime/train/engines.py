"""Two engines with one interface: `train_micro_batch`, `save`, `load`, `full_state_dict`.

TorchEngine: AdamW + transformers' LR schedule, FSDP2 when world size > 1, autocast on GPU,
gradient accumulation and clipping; checkpoints through torch.distributed.checkpoint (sharded,
rank-count independent). DeepSpeedEngine: ZeRO 1/2/3 through `deepspeed.initialize`, which does
accumulation, clipping, mixed precision and its own checkpoint format.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from lmforge.runtime.train.config import TrainConfig
from lmforge.runtime.train.modeling import param_groups, shard_fsdp2

SCHEDULER_NAMES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    from transformers import get_scheduler

    hp = cfg.hyperparameters
    return get_scheduler(
        SCHEDULER_NAMES[hp.lr_scheduler],
        optimizer,
        num_warmup_steps=hp.warmup_steps,
        num_training_steps=total_steps,
    )


def _model_inputs(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    # No attention_mask: with restarting position_ids transformers masks attention per packed sample.
    return {k: batch[k].to(device, non_blocking=True) for k in ("input_ids", "labels", "position_ids")}


class TorchEngine:
    def __init__(
        self, model: nn.Module, cfg: TrainConfig, total_steps: int, device: torch.device, world_size: int
    ):
        hp = cfg.hyperparameters
        self.cfg, self.device = cfg, device
        self.lora = cfg.method == "lora"
        self.model = shard_fsdp2(model) if world_size > 1 else model
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, hp.weight_decay), lr=hp.learning_rate, betas=ADAM_BETAS, eps=ADAM_EPS
        )
        self.scheduler = make_scheduler(cfg, self.optimizer, total_steps)
        self.accumulation = hp.gradient_accumulation_steps
        amp = device.type == "cuda" and hp.precision != "fp32"
        self.amp_dtype = (torch.bfloat16 if hp.precision == "bf16" else torch.float16) if amp else None
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_micro_batch(self, batch: dict[str, Any], is_last: bool) -> float:
        """Forward + backward of one micro-batch; on the last of a window also clip + step.
        Returns the micro-batch's mean token loss (unscaled)."""
        with self._autocast():
            loss = self.model(**_model_inputs(batch, self.device), use_cache=False).loss
        scaled = loss / self.accumulation
        (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        if is_last:
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            max_norm = self.cfg.hyperparameters.max_grad_norm
            if max_norm > 0:
                torch.nn.utils.clip_grad_norm_(
                    [p for p in self.model.parameters() if p.requires_grad], max_norm
                )
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def _state_dicts(self) -> tuple[dict, dict]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        # LoRA: only the adapters (and their optimizer state) go into checkpoints.
        return get_state_dict(
            self.model, self.optimizer, options=StateDictOptions(ignore_frozen_params=self.lora)
        )

    def save(self, directory: Path) -> None:
        """Collective. Model + optimizer shards (DCP) and, from rank 0, scheduler state."""
        import torch.distributed.checkpoint as dcp

        model_sd, optim_sd = self._state_dicts()
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(
                {"model": model_sd, "optim": optim_sd},
                checkpoint_id=str(directory / "model"),
                no_dist=not dist.is_initialized(),
            )
        if not dist.is_initialized() or dist.get_rank() == 0:
            torch.save(
                {
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict() if self.scaler else None,
                },
                directory / "scheduler.pt",
            )

    def load(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        model_sd, optim_sd = self._state_dicts()
        state = {"model": model_sd, "optim": optim_sd}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(directory / "model"), no_dist=not dist.is_initialized())
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=StateDictOptions(strict=not self.lora),
        )
        extra = torch.load(directory / "scheduler.pt", weights_only=False)
        self.scheduler.load_state_dict(extra["scheduler"])
        if self.scaler and extra["scaler"]:
            self.scaler.load_state_dict(extra["scaler"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective under FSDP: the whole unsharded state dict, on the CPU, on rank 0 (empty elsewhere)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return cast(dict[str, torch.Tensor], state)  # full_state_dict: plain tensors, no DTensors

    @property
    def module(self) -> nn.Module:
        return self.model


# --- DeepSpeed ------------------------------------------------------------------------------------


def deepspeed_config(cfg: TrainConfig, world_size: int, device_type: str) -> dict[str, Any]:
    """The DeepSpeed JSON config for `cfg` (pure; default ZeRO stage 2). The scheduler is ours
    (transformers'), handed to `deepspeed.initialize`."""
    hp = cfg.hyperparameters
    stage = cfg.zero_stage or 2
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": device_type == "cuda"}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # full weights for the final output
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": hp.batch_size,
        "gradient_accumulation_steps": hp.gradient_accumulation_steps,
        "train_batch_size": hp.batch_size * hp.gradient_accumulation_steps * world_size,
        "gradient_clipping": hp.max_grad_norm,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": hp.learning_rate,
                "betas": list(ADAM_BETAS),
                "eps": ADAM_EPS,
                "weight_decay": hp.weight_decay,
                # torch.optim.AdamW: DeepSpeed's FusedAdam would be JIT-compiled with nvcc inside the pod.
                "torch_adam": True,
            },
        },
        "steps_per_print": 2**31 - 1,  # progress is ours
        "wall_clock_breakdown": False,
    }
    if device_type == "cuda" and hp.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif device_type == "cuda" and hp.precision == "fp16":
        config["fp16"] = {"enabled": True}
    return config


class DeepSpeedEngine:
    TAG = "deepspeed"

    def __init__(
        self, model: nn.Module, cfg: TrainConfig, total_steps: int, device: torch.device, world_size: int
    ):
        import deepspeed

        self.cfg, self.device = cfg, device
        self.lora = cfg.method == "lora"
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, cfg.hyperparameters.weight_decay),
            config=deepspeed_config(cfg, world_size, device.type),
            lr_scheduler=lambda optimizer: make_scheduler(cfg, optimizer, total_steps),
        )

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def train_micro_batch(self, batch: dict[str, Any], is_last: bool) -> float:
        """DeepSpeed counts micro-steps itself: it scales by 1/accumulation and steps the optimizer
        and scheduler at the window boundary, which `is_last` marks for the other engine."""
        loss = self.engine(**_model_inputs(batch, self.device), use_cache=False).loss
        self.engine.backward(loss)
        self.engine.step()
        return loss.item()

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(
            str(directory / "model"), tag=self.TAG, save_latest=False, exclude_frozen_parameters=self.lora
        )

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(
            str(directory / "model"),
            tag=self.TAG,
            load_module_strict=not self.lora,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective under ZeRO-3 (gathers); ZeRO 1/2 keep full weights on every rank."""
        if self.engine.zero_optimization_stage() == 3:
            return self.engine._zero3_consolidated_16bit_state_dict() or {}
        return {k: v.detach().cpu() for k, v in self.engine.module.state_dict().items()}

    @property
    def module(self) -> nn.Module:
        return self.engine.module


def make_engine(
    model: nn.Module, cfg: TrainConfig, total_steps: int, device: torch.device, world_size: int
) -> TorchEngine | DeepSpeedEngine:
    cls = DeepSpeedEngine if cfg.backend == "deepspeed" else TorchEngine
    return cls(model, cfg, total_steps, device, world_size)
