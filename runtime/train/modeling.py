"""The model side: load an HF causal LM, add LoRA adapters (peft), activation checkpointing, FSDP2
sharding, and writing the final output (HF model, PEFT adapter, merged model, tokenizer files)."""

from __future__ import annotations

import contextlib
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import nn

from lmforge.runtime.train.config import TrainConfig

# Copied from the base model directory into every output directory.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft 0.21 reads `is_gradient_checkpointing`, which transformers 5 deprecated: noise in every log."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def base_dtype(path: Path) -> torch.dtype:
    """The checkpoint's own dtype (config.json `dtype`/`torch_dtype`); the output is written in it."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def load_model(cfg: TrainConfig, device: torch.device) -> nn.Module:
    """fp32 weights for full fine-tuning (autocast does bf16 on GPU); LoRA on GPU keeps the frozen
    base in bf16/fp16 and the adapters in fp32 (peft's default)."""
    from transformers import AutoModelForCausalLM

    hp = cfg.hyperparameters
    dtype = torch.float32
    if cfg.method == "lora" and device.type == "cuda" and hp.precision != "fp32":
        dtype = torch.bfloat16 if hp.precision == "bf16" else torch.float16
    model = AutoModelForCausalLM.from_pretrained(cfg.model_path, dtype=dtype)
    model.config.use_cache = False
    if hp.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if cfg.method == "lora":
        import peft

        lora = cfg.lora
        with _quiet_peft():
            peft_model = peft.get_peft_model(
                model,
                peft.LoraConfig(
                    r=lora.r,
                    lora_alpha=lora.alpha,
                    lora_dropout=lora.dropout,
                    target_modules=list(lora.target_modules),
                    task_type="CAUSAL_LM",
                ),
            )
        return peft_model.to(device).train()
    return model.to(device).train()  # type: ignore[arg-type]  # transformers types its wrapped .to() as if self were the argument


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks (transformers' `_no_split_modules`, e.g. LlamaDecoderLayer)."""
    base = getattr(model, "get_base_model", lambda: model)()  # peft wraps the transformers model
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_fsdp2(model: nn.Module) -> nn.Module:
    """FSDP2: one parameter group per decoder layer, then the rest (embeddings, norm, head)."""
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(model)
    if not layers:
        raise RuntimeError(f"{type(model).__name__}: no decoder layers found to shard (no _no_split_modules)")
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters; matrices decay, vectors (norms, biases) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)


class _SavesPretrained(Protocol):
    """A transformers model or a peft model: both write their directory with save_pretrained."""

    def save_pretrained(self, save_directory: Path, *, state_dict: dict[str, torch.Tensor]) -> None: ...


def save_output(model: nn.Module, state_dict: dict[str, torch.Tensor], cfg: TrainConfig) -> Path:
    """Rank 0, with the gathered full `state_dict`: full -> an HF checkpoint in the base model's
    dtype; lora -> a PEFT adapter directory (+ `<dir>/merged` with mergeAdapter)."""
    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    saver = cast(_SavesPretrained, model)
    if cfg.method == "full":
        dtype = base_dtype(cfg.model_path)
        state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
        saver.save_pretrained(out, state_dict=state_dict)
    else:
        saver.save_pretrained(out, state_dict=state_dict)  # peft keeps only the adapter weights
        if cfg.output.merge_adapter:
            merge_adapter(cfg.model_path, out, out / "merged")
    copy_tokenizer_files(cfg.model_path, out)
    return out


def merge_adapter(base_path: Path, adapter_path: Path, out: Path) -> None:
    """Loads the base model fresh on the CPU, merges the adapter into its weights, saves HF layout."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=base_dtype(base_path))
    with _quiet_peft():
        merged = PeftModel.from_pretrained(base, adapter_path).merge_and_unload()
    merged.save_pretrained(out)
    copy_tokenizer_files(base_path, out)
