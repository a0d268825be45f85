"""Tensor parallelism on this machine: the per-step message to the workers, and TP=N vs TP=1 tokens/s.

    python -m bench.tensor_parallel --device cpu --dtype float32                     # both parts, "small" shape
    python -m bench.tensor_parallel --device cpu --dtype float32 --shape tiny --num-prompts 4 --max-tokens 4  # smoke
    python -m bench.tensor_parallel --shape llama-3.1-8b --tp 2                      # GPUs: the 8B shape

1. message: rank 0 sends a decode step's StepInputs (--batch sequences, --context tokens each) to N-1
   reader processes, then all ranks all-reduce one float (the forward's first collective): µs per step
   for the shared-memory ring and the gloo broadcast, minus the all-reduce alone (the baseline, same
   processes). Medians over --steps.
2. throughput: LLM.generate with tensor_parallel_size=--tp vs 1 on the same random-init shape
   (load_format="dummy"), greedy, exactly --max-tokens tokens per prompt; output tokens / wall time.
   On CPU a "device" is cores / --tp threads (the GPU analogy: TP=1 on one GPU, TP=N on N): TP=1 runs
   that many threads, and so does each of the N ranks.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any


def step_message(batch: int, context: int, block_size: int = 16):
    """A decode step of `batch` sequences at `context` tokens: what ModelRunner.execute sends."""
    from lmforge.runtime.engine.step_inputs import step_inputs_from_lists

    blocks = -(-context // block_size)
    return step_inputs_from_lists(
        list(range(batch)),
        [context - 1] * batch,
        [context // 2] * batch,
        [b * block_size for b in range(batch)],
        [list(range(b * blocks, (b + 1) * blocks)) for b in range(batch)],
        [1] * batch,
        [context] * batch,
        block_size=block_size,
        logit_calls=[list(range(batch))],
    ).message()


def _rank(rank: int, world: int, init: str, ring: Any, steps: int, batch: int, context: int) -> list[float]:
    """Every rank: for each mode, `steps` x (message?, all-reduce); returns µs per step per mode.
    `ring`: rank 0's ShmRingChannel, or the ring's name on a reader."""
    import torch
    import torch.distributed as dist

    from lmforge.runtime.engine.tp_channel import BroadcastChannel, ShmRingChannel

    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    if rank:
        ring = ShmRingChannel(world - 1, name=ring, reader=rank - 1)
    broadcast = BroadcastChannel()
    msg = step_message(batch, context)
    x = torch.zeros(1)
    medians = []
    for mode in ("none", "shm", "broadcast"):
        times = []
        dist.barrier()
        for _ in range(steps):
            start = time.perf_counter()
            channel = ring if mode == "shm" else broadcast
            if mode != "none":
                if rank == 0:
                    channel.send(msg)
                else:
                    channel.recv(poll_parent=False)
            dist.all_reduce(x)
            times.append(time.perf_counter() - start)
        medians.append(statistics.median(times) * 1e6)
    dist.barrier()
    if rank:
        ring.close()
    dist.destroy_process_group()
    return medians


def bench_message(args: argparse.Namespace) -> dict:
    from lmforge.runtime.engine.tp_channel import ShmRingChannel

    owner = ShmRingChannel(args.tp - 1)  # created here so that the readers can attach by name
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        init = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    common = [str(args.tp), init, owner.name, str(args.steps), str(args.batch), str(args.context)]
    procs = [
        subprocess.Popen([sys.executable, "-P", str(Path(__file__).resolve()), "--rank", str(r), *common])
        for r in range(1, args.tp)
    ]
    try:
        none, shm, bcast = _rank(0, args.tp, init, owner, args.steps, args.batch, args.context)
    finally:
        for p in procs:
            p.wait(timeout=120)
        owner.close(unlink=True)
    size = len(__import__("pickle").dumps(step_message(args.batch, args.context)))
    return {
        "ranks": args.tp,
        "batch": args.batch,
        "context": args.context,
        "message_bytes": size,
        "all_reduce_alone_us": round(none, 1),
        "shm_ring_overhead_us": round(shm - none, 1),
        "gloo_broadcast_overhead_us": round(bcast - none, 1),
    }


def bench_throughput(args: argparse.Namespace, path: Path, tp: int) -> dict:
    import torch

    from lmforge import LLM, SamplingParams

    if args.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.tp))

    llm = LLM(
        path,
        load_format="dummy",
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.prompt_len + args.max_tokens,
        enable_prefix_caching=False,
        enforce_eager=args.enforce_eager,
        tensor_parallel_size=tp,
        num_blocks=args.num_prompts * (-(-(args.prompt_len + args.max_tokens) // 16)) + 8,
    )
    try:
        prompts = [[(7 * i + j) % 1000 + 3 for j in range(args.prompt_len)] for i in range(args.num_prompts)]
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True, detokenize=False
        )
        llm.generate(prompts[:2], SamplingParams(max_tokens=2, ignore_eos=True, detokenize=False))  # warm-up
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        seconds = time.perf_counter() - start
    finally:
        llm.shutdown()
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "tensor_parallel_size": tp,
        "threads_per_rank": torch.get_num_threads(),
        "seconds": round(seconds, 3),
        "output_tokens_per_s": round(generated / seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    from bench import model_shapes

    p = model_shapes.argument_parser(__doc__)
    p.set_defaults(shape="small")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--steps", type=int, default=2000, help="message part: steps per mode")
    p.add_argument("--batch", type=int, default=32, help="message part: sequences per decode step")
    p.add_argument("--context", type=int, default=512, help="message part: tokens per sequence")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--skip-throughput", action="store_true")
    args = p.parse_args(argv)
    if model_shapes.cuda_missing(args.device):
        return 2
    report: dict = {"shape": args.shape, "device": args.device, "message": bench_message(args)}
    if not args.skip_throughput:
        with tempfile.TemporaryDirectory() as tmp:
            path = model_shapes.write_shape(
                Path(tmp) / args.shape, args.shape, args.prompt_len + args.max_tokens
            )
            one = bench_throughput(args, path, 1)
            many = bench_throughput(args, path, args.tp)
        report["throughput"] = {
            "tp1": one,
            f"tp{args.tp}": many,
            "speedup": round(many["output_tokens_per_s"] / one["output_tokens_per_s"], 3),
        }
    report["environment"] = model_shapes.environment(args.device)
    print(json.dumps(report))
    if args.save:
        model_shapes.save(report, "tensor_parallel")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rank":  # a reader rank of the message part (spawned above)
        r, world, init, name, steps, batch, context = sys.argv[2:9]
        import torch

        torch.set_num_threads(1)
        _rank(int(r), int(world), init, name, int(steps), int(batch), int(context))
        sys.exit(0)
    sys.exit(main())
