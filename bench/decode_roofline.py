"""Decode speed at small batch against the memory roofline, and HF `generate` in the same process.

    python -m bench.decode_roofline                       # Llama-3.2-1B shape, bf16, bs 1, 128 in, 256 out (CUDA)
    python -m bench.decode_roofline --save                # ... and write bench/results/decode-roofline-<gpu>-<time>.json
    python -m bench.decode_roofline --device cpu --shape tiny --dtype float32 --new-tokens 16   # smoke run

A decode step at batch 1 must read every weight once plus the KV cache so far, so it cannot be
faster than (those bytes) / (memory bandwidth). The bandwidth is measured here (a 1 GiB device
copy), the bytes are counted from the model actually loaded, and the result is reported as
decode tok/s and as a fraction of that roofline. Decode time is first token -> last token of each
request (the engine's request metrics), so prefill is excluded on both sides: for HF it is the
difference of a 1-token and an (N+1)-token `generate`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import model_shapes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = model_shapes.argument_parser(__doc__)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side; the best is reported")
    return p.parse_args(argv)


def bench_ours(path: Path, prompts: list[list[int]], args: argparse.Namespace) -> tuple[dict, object]:
    from lmforge import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(
        path,
        load_format="dummy",
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.prompt_len + args.new_tokens + 16,
        max_num_seqs=args.batch,
        enable_prefix_caching=False,
        enforce_eager=args.enforce_eager,
    )
    engine = llm.llm_engine
    startup = time.perf_counter() - started
    params = SamplingParams(
        max_tokens=args.new_tokens + 1, temperature=0.0, ignore_eos=True, detokenize=False
    )
    llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, detokenize=False))
    best = 0.0
    for _ in range(args.repeats):
        model_shapes.sync(args.device)
        outs = llm.generate(prompts, params)
        first = min(o.metrics["first_token_time"] for o in outs)
        last = max(o.metrics["finish_time"] for o in outs)
        best = max(best, len(outs) * args.new_tokens / (last - first))
    result = {
        "decode_tok_s": round(best, 1),
        "startup_s": round(startup, 2),
        "cuda_graph_capture_s": round(engine.cuda_graph_seconds, 2),
        "cuda_graphs": engine.runner.decode_graphs is not None and bool(engine.runner.decode_graphs.graphs),
        "kernel_backend": engine.runner.backend.name,
        "kv_cache_blocks": engine.runner.num_blocks,
    }
    return result, engine.runner.model


def bench_hf(path: Path, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    ids = torch.tensor(prompts, device=args.device)
    kw = dict(do_sample=False, pad_token_id=2, attention_mask=torch.ones_like(ids))

    def timed(new: int) -> float:
        model_shapes.sync(args.device)
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
        model_shapes.sync(args.device)
        return time.perf_counter() - start

    best = 0.0
    with torch.inference_mode():
        timed(8)  # warm-up
        for _ in range(args.repeats):
            prefill = timed(1)
            best = max(best, len(prompts) * args.new_tokens / (timed(args.new_tokens + 1) - prefill))
    return {"decode_tok_s": round(best, 1)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if model_shapes.cuda_missing(args.device):
        print(
            "bench/decode_roofline.py needs a CUDA GPU (or --device cpu --shape tiny for a smoke run)",
            file=sys.stderr,
        )
        return 2
    env = model_shapes.environment(args.device)
    bandwidth = model_shapes.copy_bandwidth_gbps(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        path = model_shapes.write_shape(
            Path(tmp) / "model", args.shape, args.prompt_len + args.new_tokens + 16
        )
        config = json.loads((path / "config.json").read_text())
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(
            3, config["vocab_size"], (args.batch, args.prompt_len), generator=gen
        ).tolist()
        ours, model = bench_ours(path, prompts, args)
        step = model_shapes.decode_step_bytes(
            model,
            config,
            args.batch,
            args.prompt_len + args.new_tokens / 2,
            torch.empty(0, dtype=getattr(torch, args.dtype)).element_size(),
        )
        del model
        roofline = args.batch * bandwidth * 1e9 / step["total"]
        report = {
            "benchmark": "decode_roofline",
            "shape": args.shape,
            "dtype": args.dtype,
            "batch": args.batch,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "env": env,
            "copy_bandwidth_gbps": round(bandwidth, 1),
            "bytes_per_step": step,
            "roofline_tok_s": round(roofline, 1),
            "lmforge": ours,
            "roofline_fraction": round(ours["decode_tok_s"] / roofline, 3),
        }
        if not args.skip_hf:
            model_shapes.release_memory(args.device)  # our engine (KV cache, graphs) goes before HF allocates
            report["hf_generate"] = bench_hf(path, prompts, args)
            report["speedup_vs_hf"] = round(ours["decode_tok_s"] / report["hf_generate"]["decode_tok_s"], 2)
    print(json.dumps(report))
    if args.save:
        print(f"saved {model_shapes.save(report, 'decode-roofline')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
