"""One rank of the tensor-parallel family sweep (test_tensor_parallel.py): `python -P tp_ranks.py RANK
WORLD INIT_METHOD CASES_JSON OUT_JSON`; with WORLD 1, `greedy` is also imported by the test in-process
for the reference.

Every rank builds its shard of each case's model through the real ModelRunner (local config, parallel
modules, get_slice loading, the rank's KV heads in its own paged cache), then decodes greedily: a
prompt longer than any window as one prefill step, then decode steps, the LM head's vocab shards
gathered on every rank so that every rank picks the same token. Rank 0 writes tokens and log-softmax
rows.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta

import torch

from lmforge.runtime.engine.model_runner import ModelRunner
from lmforge.runtime.engine.step_inputs import step_inputs_from_lists
from lmforge.runtime.models.config import load_model_config
from lmforge.runtime.models.parallel import TPGroup, TPLayout

PROMPT_LEN = 44  # past the 20-24-token windows of the tiny specs
NUM_DECODE = 6
BLOCK_SIZE = 8


def greedy(model_dir: str, kv_cache_dtype: str, rank: int, world: int) -> dict:
    cfg = load_model_config(model_dir)
    cfg.model, cfg.max_model_len = model_dir, 128
    tp = (TPLayout.for_config(cfg, rank, world), TPGroup(rank, world)) if world > 1 else None
    runner = ModelRunner(
        model_dir,
        cfg,
        device=torch.device("cpu"),
        dtype=torch.float32,
        max_model_len=128,
        block_size=BLOCK_SIZE,
        kv_cache_dtype=kv_cache_dtype,
        tp=tp,
    )
    runner.allocate_kv_cache(16)
    table = [3, 9, 4, 12, 1, 7, 15, 0, 2, 5]  # scattered blocks: the slot mapping matters
    tokens = [(7 * i + 5) % (cfg.vocab_size - 3) + 3 for i in range(PROMPT_LEN)]
    rows: list[list[float]] = []
    out: list[int] = []
    start = 0
    with torch.inference_mode():
        for _ in range(NUM_DECODE + 1):
            end = len(tokens)
            step = step_inputs_from_lists(
                tokens[start:end],
                list(range(start, end)),
                [PROMPT_LEN] * (end - start),
                [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, end)],
                [table[: -(-end // BLOCK_SIZE)]],
                [end - start],
                [end],
                block_size=BLOCK_SIZE,
            )
            hidden, _ = runner.forward_step(step, run_logit_calls=False)
            logprobs = runner.compute_logits(hidden[-1:]).float().log_softmax(-1)[0]
            rows.append(logprobs.tolist())
            out.append(int(logprobs.argmax()))
            tokens.append(out[-1])
            start = end
    return {"tokens": out, "rows": rows}


def main(argv: list[str]) -> int:
    rank, world, init_method, cases_path, out_path = int(argv[0]), int(argv[1]), argv[2], argv[3], argv[4]
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    results = {}
    for case in json.loads(open(cases_path).read()):
        try:
            results[case["id"]] = greedy(case["model"], case["kv_cache_dtype"], rank, world)
        except ValueError as exc:  # a refusal (the same on every rank: it comes from the shapes)
            results[case["id"]] = {"error": str(exc)}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
