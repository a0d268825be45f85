"""lmforge.runtime.train: the TrainJob worker (`python -m lmforge.runtime.train`, `lmforge train`).

    config.py       camelCase config file + CLI overrides -> TrainConfig (pure)
    data.py         JSONL -> tokens/labels -> packed rows -> sharded deterministic order (pure)
    modeling.py     HF model + peft LoRA + activation checkpointing + FSDP2; final output
    engines.py      TorchEngine (AdamW, FSDP2, DCP checkpoints) and DeepSpeedEngine (ZeRO 1/2/3)
    checkpoint.py   atomic checkpoint dirs, manifest, keep-last-K, resume discovery, RNG states
    progress.py     tqdm-style stdout line + pod annotation lmforge.dev/progress
    loop.py         the loop: steps, all-reduce, checkpoints, SIGTERM -> exit 143

Importing this package is cheap (no torch); `main` imports the rest.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    """Parses flags (see lmforge.runtime.train_args), trains, returns the exit code: 0 done,
    2 bad config or dataset, 143 stopped by SIGTERM after checkpointing."""
    from lmforge.runtime.train_args import build_parser

    args = build_parser().parse_args(list(argv) if argv is not None else None)
    return run_args(args)


TERMINATION_LOG = Path("/dev/termination-log")


def _termination_message(message: str) -> None:
    """Kubernetes shows it in the pod status (and the operator in TrainJob.status.lastFailure)."""
    try:
        if TERMINATION_LOG.exists():
            TERMINATION_LOG.write_text(message[-4000:])
    except OSError:
        pass


def run_args(args) -> int:
    """Entry for `lmforge train` (the CLI's parser already holds `add_train_arguments`)."""
    from lmforge.runtime.hub import HubError
    from lmforge.runtime.storage.s3 import StorageError
    from lmforge.runtime.train.config import ConfigError, load_config
    from lmforge.runtime.train.data import DatasetError
    from lmforge.runtime.train_args import overrides_from_args

    try:
        cfg = load_config(args.config, overrides_from_args(args))
    except (ConfigError, OSError) as exc:
        print(f"lmforge train: config error: {exc}", file=sys.stderr)
        return 2
    try:  # hf:// and s3:// sources are downloaded now, before any process group or GPU memory exists
        _ = (cfg.model_path, cfg.dataset_path)
    except ConfigError as exc:
        print(f"lmforge train: config error: {exc}", file=sys.stderr)
        return 2
    except (HubError, StorageError) as exc:
        print(f"lmforge train: download error: {exc}", file=sys.stderr)
        _termination_message(f"download error: {exc}")
        return 1
    from lmforge.runtime.train.loop import train

    try:
        return train(cfg)
    except DatasetError as exc:
        print(f"lmforge train: dataset error: {exc}", file=sys.stderr)
        return 2


__all__ = ["main", "run_args"]
