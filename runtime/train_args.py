"""`lmforge train` / `python -m lmforge.runtime.train` arguments. Stdlib only (no torch), so
`lmforge --help` stays fast.

The config file (`--config`, JSON or YAML) uses the TrainJob's camelCase keys; every flag below
overrides one key of it. `overrides_from_args` turns the parsed flags into that nested dict.
"""

from __future__ import annotations

import argparse
from typing import Any

# flag dest -> (section or None for the top level, camelCase key)
_KEYS: dict[str, tuple[str | None, str]] = {
    "model": (None, "model"),
    "dataset": ("dataset", "source"),
    "dataset_format": ("dataset", "format"),
    "max_samples": ("dataset", "maxSamples"),
    "method": (None, "method"),
    "backend": (None, "backend"),
    "zero_stage": (None, "zeroStage"),
    "learning_rate": ("hyperparameters", "learningRate"),
    "epochs": ("hyperparameters", "epochs"),
    "max_steps": ("hyperparameters", "maxSteps"),
    "batch_size": ("hyperparameters", "batchSize"),
    "seq_len": ("hyperparameters", "seqLen"),
    "gradient_accumulation_steps": ("hyperparameters", "gradientAccumulationSteps"),
    "warmup_steps": ("hyperparameters", "warmupSteps"),
    "weight_decay": ("hyperparameters", "weightDecay"),
    "lr_scheduler": ("hyperparameters", "lrScheduler"),
    "max_grad_norm": ("hyperparameters", "maxGradNorm"),
    "precision": ("hyperparameters", "precision"),
    "activation_checkpointing": ("hyperparameters", "gradientCheckpointing"),
    "seed": ("hyperparameters", "seed"),
    "log_every_steps": ("hyperparameters", "logEverySteps"),
    "lora_r": ("lora", "r"),
    "lora_alpha": ("lora", "alpha"),
    "lora_dropout": ("lora", "dropout"),
    "lora_target_modules": ("lora", "targetModules"),
    "checkpoint_dir": ("checkpoint", "dir"),
    "checkpoint_every_steps": ("checkpoint", "everySteps"),
    "keep_last": ("checkpoint", "keepLast"),
    "resume": ("checkpoint", "resume"),
    "output_dir": ("output", "dir"),
    "merge_adapter": ("output", "mergeAdapter"),
}


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the trainer's flags to `parser` and returns it. Every flag defaults to None: unset
    flags leave the config file's value (or the built-in default) alone."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="JSON or YAML file with TrainJob keys (the operator mounts /etc/lmforge/train.json)",
    )
    parser.add_argument(
        "--local-rank", "--local_rank", dest="local_rank", type=int, default=None, help=argparse.SUPPRESS
    )  # the DeepSpeed launcher passes it; LOCAL_RANK env wins

    job = parser.add_argument_group("job")
    job.add_argument(
        "--model", metavar="PATH", help="base model directory (HF layout), or hostPath:// / pvc:// URI"
    )
    job.add_argument("--dataset", metavar="PATH", help="JSONL file or directory of *.jsonl files")
    job.add_argument(
        "--dataset-format",
        choices=["text", "messages"],
        help='rows are {"text"} or {"messages"} (default: decided per row)',
    )
    job.add_argument("--max-samples", type=int, metavar="N", help="use at most this many rows")
    job.add_argument("--method", choices=["full", "lora"], help="full fine-tune or LoRA (default: lora)")
    job.add_argument(
        "--backend",
        choices=["torchrun", "deepspeed"],
        help="torchrun: plain / FSDP2; deepspeed: ZeRO (default: torchrun)",
    )
    job.add_argument("--zero-stage", type=int, choices=[1, 2, 3], help="DeepSpeed ZeRO stage (default: 2)")

    hp = parser.add_argument_group("hyperparameters")
    hp.add_argument(
        "--learning-rate",
        "--lr",
        dest="learning_rate",
        type=float,
        metavar="X",
        help="peak AdamW learning rate",
    )
    hp.add_argument("--epochs", type=int, metavar="N", help="passes over the dataset (default: 1)")
    hp.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps (overrides epochs)")
    hp.add_argument("--batch-size", type=int, metavar="N", help="sequences per rank per micro-step")
    hp.add_argument("--seq-len", type=int, metavar="N", help="tokens per packed sequence")
    hp.add_argument(
        "--gradient-accumulation-steps", type=int, metavar="N", help="micro-steps per optimizer step"
    )
    hp.add_argument("--warmup-steps", type=int, metavar="N", help="linear warm-up steps")
    hp.add_argument("--weight-decay", type=float, metavar="X", help="AdamW weight decay")
    hp.add_argument("--lr-scheduler", choices=["cosine", "linear", "constant"], help="schedule after warm-up")
    hp.add_argument("--max-grad-norm", type=float, metavar="X", help="gradient clipping norm (0: off)")
    hp.add_argument("--precision", choices=["bf16", "fp16", "fp32"], help="autocast dtype on GPU (CPU: fp32)")
    hp.add_argument(
        "--activation-checkpointing",
        "--gradient-checkpointing",
        dest="activation_checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="recompute activations in backward",
    )
    hp.add_argument("--seed", type=int, metavar="N", help="seed of data order, adapter init and dropout")
    hp.add_argument(
        "--log-every-steps", type=int, metavar="N", help="progress line / pod annotation interval in steps"
    )

    lora = parser.add_argument_group("lora")
    lora.add_argument("--lora-r", type=int, metavar="N", help="adapter rank")
    lora.add_argument("--lora-alpha", type=int, metavar="N", help="adapter scaling numerator")
    lora.add_argument("--lora-dropout", type=float, metavar="X", help="dropout on the adapter input")
    lora.add_argument("--lora-target-modules", nargs="+", metavar="NAME", help="Linear module names to adapt")

    ckpt = parser.add_argument_group("checkpoint and output")
    ckpt.add_argument("--checkpoint-dir", metavar="DIR", help="default: <output-dir>/checkpoints")
    ckpt.add_argument("--checkpoint-every-steps", type=int, metavar="N", help="save every N optimizer steps")
    ckpt.add_argument("--keep-last", type=int, metavar="N", help="checkpoints kept")
    ckpt.add_argument(
        "--resume", choices=["auto", "never"], help="auto: continue from the newest complete checkpoint"
    )
    ckpt.add_argument("--output-dir", metavar="DIR", help="final HF model or PEFT adapter directory")
    ckpt.add_argument(
        "--merge-adapter",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="lora: also write the merged model to <output-dir>/merged",
    )
    return parser


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that were given, as a nested camelCase dict shaped like the config file."""
    out: dict[str, Any] = {}
    for dest, (section, key) in _KEYS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        (out.setdefault(section, {}) if section else out)[key] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lmforge.runtime.train",
        description="Fine-tune a causal LM (full or LoRA) under torchrun or DeepSpeed.",
    )
    return add_train_arguments(parser)
