"""Offline throughput: LLM.generate vs Hugging Face `generate` on the same model and prompts.

    python -m bench.offline --device cpu --dtype float32 --hidden-size 256 --num-layers 4
    python -m bench.offline --model /path/to/checkpoint --device cuda --dtype bfloat16 --num-prompts 64

Without --model a tiny random checkpoint of the given shape is written to a temp dir. Prompts are
random token ids of one length (so HF needs no padding); both sides decode greedily for exactly
--max-tokens tokens. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF checkpoint dir; default: a tiny random model of the shape below")
    p.add_argument("--arch", default="llama", help="tiny model arch: llama, llama31, llama32, mistral, qwen2")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=384)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--skip-hf", action="store_true")
    return p.parse_args()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_ours(
    path: Path, prompts: list[list[int]], args: argparse.Namespace
) -> tuple[dict, list[list[int]]]:
    from lmforge import LLM, SamplingParams

    max_len = args.prompt_len + args.max_tokens
    llm = LLM(
        path,
        device=args.device,
        dtype=args.dtype,
        max_model_len=max_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=False,
    )
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # warm-up
    sync(args.device)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    sync(args.device)
    seconds = time.perf_counter() - start
    tokens = [o.outputs[0].token_ids for o in outs]
    return _result(seconds, sum(map(len, tokens)), args), tokens


def bench_hf(path: Path, prompts: list[list[int]], args: argparse.Namespace) -> tuple[dict, list[list[int]]]:
    from transformers import AutoModelForCausalLM

    model = (
        AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    )
    ids = torch.tensor(prompts, device=args.device)
    kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        model.generate(
            ids[:2], max_new_tokens=4, min_new_tokens=4, **{**kw, "attention_mask": torch.ones_like(ids[:2])}
        )
        sync(args.device)
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens, **kw)
        sync(args.device)
    seconds = time.perf_counter() - start
    tokens = out[:, ids.shape[1] :].tolist()
    return _result(seconds, sum(map(len, tokens)), args), tokens


def _result(seconds: float, generated: int, args: argparse.Namespace) -> dict:
    prompt_tokens = args.num_prompts * args.prompt_len
    return {
        "seconds": round(seconds, 4),
        "generated_tokens": generated,
        "output_tok_s": round(generated / seconds, 1),
        "total_tok_s": round((generated + prompt_tokens) / seconds, 1),
    }


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            path = Path(args.model)
        else:
            from lmforge.runtime.models.tiny import save_tiny_model

            path = save_tiny_model(
                Path(tmp) / "model",
                args.arch,
                hidden_size=args.hidden_size,
                num_layers=args.num_layers,
                num_heads=args.num_heads,
                num_kv_heads=args.num_kv_heads,
                vocab_size=args.vocab_size,
            )
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, vocab, (args.num_prompts, args.prompt_len), generator=g).tolist()
        ours, our_tokens = bench_ours(path, prompts, args)
        report = {
            "model": str(args.model)
            if args.model
            else {
                "arch": args.arch,
                "hidden_size": args.hidden_size,
                "num_layers": args.num_layers,
                "num_heads": args.num_heads,
                "num_kv_heads": args.num_kv_heads,
                "vocab_size": vocab,
            },
            "device": args.device,
            "dtype": args.dtype,
            "threads": torch.get_num_threads(),
            "num_prompts": args.num_prompts,
            "prompt_len": args.prompt_len,
            "max_tokens": args.max_tokens,
            "lmforge": ours,
        }
        if not args.skip_hf:
            hf, hf_tokens = bench_hf(path, prompts, args)
            report["hf"] = hf
            report["speedup_output_tok_s"] = round(ours["output_tok_s"] / hf["output_tok_s"], 3)
            report["greedy_sequences_identical"] = sum(
                a == b for a, b in zip(our_tokens, hf_tokens, strict=True)
            )
        print(json.dumps(report))  # one line, last on stdout (libraries may log above it)


if __name__ == "__main__":
    main()
