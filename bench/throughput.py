"""Offline throughput of a real model shape: LLM.generate vs HF `generate` (static cache), same process.

    python -m bench.throughput                                  # Llama-3.2-1B shape, 1024 x (128 in -> 128 out)
    python -m bench.throughput --shape llama-3.1-8b --skip-hf   # the 8B shape
    python -m bench.throughput --save                           # ... and write bench/results/throughput-<gpu>-<time>.json
    python -m bench.throughput --device cpu --shape tiny --dtype float32 --num-prompts 8 --max-tokens 8   # smoke run

Random-init weights of the named shape (`load_format="dummy"` on our side, `from_config` on HF's),
random prompt ids of one length (HF needs no padding), greedy decoding of exactly --max-tokens
tokens on both sides (ignore_eos). HF runs in batches of --hf-batch with `cache_implementation`
--hf-cache. Output tok/s = generated tokens / wall time of the whole run.
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
    p.add_argument("--num-prompts", type=int, default=1024)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--hf-batch", type=int, default=128)
    p.add_argument("--hf-cache", default="static", help="HF cache_implementation (static, dynamic)")
    return p.parse_args(argv)


def bench_ours(path: Path, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    from lmforge import LLM, SamplingParams

    llm = LLM(
        path,
        load_format="dummy",
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.prompt_len + args.max_tokens,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=False,
        enforce_eager=args.enforce_eager,
    )
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    llm.generate(
        prompts[:8], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, detokenize=False)
    )
    model_shapes.sync(args.device)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    model_shapes.sync(args.device)
    seconds = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    engine = llm.llm_engine
    return {
        **_rates(seconds, generated, args),
        "kv_cache_blocks": engine.runner.num_blocks,
        "cuda_graphs": engine.runner.decode_graphs is not None and bool(engine.runner.decode_graphs.graphs),
        "kernel_backend": engine.runner.backend.name,
    }


def bench_hf(path: Path, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(path), dtype=getattr(torch, args.dtype)
    )
    model = model.to(args.device).eval()
    kw = dict(
        do_sample=False,
        pad_token_id=2,
        max_new_tokens=args.max_tokens,
        min_new_tokens=args.max_tokens,
        cache_implementation=args.hf_cache,
    )
    batches = [
        torch.tensor(prompts[i : i + args.hf_batch], device=args.device)
        for i in range(0, len(prompts), args.hf_batch)
    ]
    generated = 0
    with torch.inference_mode():
        model.generate(batches[0], attention_mask=torch.ones_like(batches[0]), **kw)  # warm-up
        model_shapes.sync(args.device)
        start = time.perf_counter()
        for ids in batches:
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
            generated += (out.shape[1] - ids.shape[1]) * ids.shape[0]
        model_shapes.sync(args.device)
    seconds = time.perf_counter() - start
    del model
    return {**_rates(seconds, generated, args), "batch": args.hf_batch, "cache_implementation": args.hf_cache}


def _rates(seconds: float, generated: int, args: argparse.Namespace) -> dict:
    prompt_tokens = args.num_prompts * args.prompt_len
    return {
        "seconds": round(seconds, 3),
        "generated_tokens": generated,
        "output_tok_s": round(generated / seconds, 1),
        "total_tok_s": round((generated + prompt_tokens) / seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if model_shapes.cuda_missing(args.device):
        print(
            "bench/throughput.py needs a CUDA GPU (or --device cpu --shape tiny for a smoke run)",
            file=sys.stderr,
        )
        return 2
    report = {
        "benchmark": "throughput",
        "shape": args.shape,
        "dtype": args.dtype,
        "num_prompts": args.num_prompts,
        "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens,
        "env": model_shapes.environment(args.device),
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = model_shapes.write_shape(Path(tmp) / "model", args.shape, args.prompt_len + args.max_tokens)
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, vocab, (args.num_prompts, args.prompt_len), generator=gen).tolist()
        report["lmforge"] = bench_ours(path, prompts, args)
        if not args.skip_hf:
            model_shapes.release_memory(args.device)  # our engine (KV cache, graphs) goes before HF allocates
            report["hf_generate"] = bench_hf(path, prompts, args)
            report["speedup_vs_hf"] = round(
                report["lmforge"]["output_tok_s"] / report["hf_generate"]["output_tok_s"], 2
            )
    print(json.dumps(report))
    if args.save:
        print(f"saved {model_shapes.save(report, 'throughput')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
