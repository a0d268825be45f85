"""Trainer throughput on this machine (CPU or one GPU), world size 1: tokens/s of full fine-tuning
and LoRA on tiny random Llamas. Not a test.

    python -m bench.train                       # tiny (hidden 64, 2 layers) and small (256, 4)
    python -m bench.train --steps 50 --seq-len 512 --threads 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

SHAPES = {
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2),
    "small": dict(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4),
}
WORDS = "the cat sat on the mat one two three four five abc def ghi".split()


def write_dataset(path: Path, rows: int, words_per_row: int) -> None:
    with path.open("w") as f:
        for i in range(rows):
            f.write(
                json.dumps({"text": " ".join(WORDS[(i + k) % len(WORDS)] for k in range(words_per_row))})
                + "\n"
            )


def measure(
    model: Path, data: Path, out: Path, method: str, steps: int, batch_size: int, seq_len: int
) -> dict:
    from lmforge.runtime.train.config import config_from_dict
    from lmforge.runtime.train.loop import train

    cfg = config_from_dict(
        {
            "model": str(model),
            "dataset": {"source": str(data), "format": "text"},
            "method": method,
            "hyperparameters": {
                "maxSteps": steps,
                "batchSize": batch_size,
                "seqLen": seq_len,
                "learningRate": 1e-3,
                "logEverySteps": steps,
            },
            "checkpoint": {"everySteps": 10**9},
            "output": {"dir": str(out)},
        }
    )
    stamps: list[float] = []
    started = time.perf_counter()
    assert train(cfg, on_step=lambda step, loss: stamps.append(time.perf_counter())) == 0
    total = time.perf_counter() - started
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    warm = min(3, steps - 1)  # the first steps include allocator/autograd warm-up
    tokens = sum(r["tokens"] for r in log[warm:])
    return {
        "method": method,
        "steps": steps,
        "tokens_per_s": tokens / (stamps[-1] - stamps[warm - 1]),
        "steps_per_s": (steps - warm) / (stamps[-1] - stamps[warm - 1]),
        "wall_s_incl_load_and_save": total,
        "first_loss": log[0]["loss"],
        "last_loss": log[-1]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()

    import torch

    from lmforge.runtime.models.tiny import save_tiny_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"device {device}, torch threads {torch.get_num_threads()}, batch {args.batch_size} x seq {args.seq_len}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "data.jsonl"
        write_dataset(data, rows=args.steps * args.batch_size * 2, words_per_row=args.seq_len // 3)
        for shape in args.shapes:
            model = save_tiny_model(root / shape, "llama", **SHAPES[shape])
            for method in ("full", "lora"):
                result = measure(
                    model, data, root / f"{shape}-{method}", method, args.steps, args.batch_size, args.seq_len
                )
                print(
                    json.dumps(
                        {
                            "shape": shape,
                            **{k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()},
                        }
                    )
                )


if __name__ == "__main__":
    main()
