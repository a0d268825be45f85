"""Offline throughput: LLM.generate vs Hugging Face `generate` on the same model and prompts.

    python -m bench.offline --device cpu --dtype float32 --hidden-size 256 --num-layers 4
    python -m bench.offline --model /path/to/checkpoint --device cuda --dtype bfloat16 --num-prompts 64

Without --model a tiny random checkpoint of the given shape is written to a temp dir. Prompts are
random token ids of one length (so HF needs no padding); both sides decode greedily for exactly
--max-tokens tokens. Prints one JSON object.

    python -m bench.offline --mixed --num-prompts 128

`--mixed`: a mixed-length workload, prompts of U[16, 256] tokens and outputs of U[16, 128] tokens, each
request with its own max_tokens. lmforge gets all of them at once (continuous batching); HF `generate`
runs them in arrival order in static batches (left-padded, each batch decoding to its longest
max_tokens; only each request's own tokens count) of every size in --hf-batch-sizes, and the best
size is the baseline. Greedy tokens are compared request by request.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    p.add_argument(
        "--mixed", action="store_true", help="prompts U[16,256], outputs U[16,128] (own max_tokens)"
    )
    p.add_argument("--hf-batch-sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--async-scheduling", action="store_true", help="lmforge with async scheduling")
    return p.parse_args(argv)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_ours(
    path: Path, prompts: list[list[int]], max_tokens: list[int], args: argparse.Namespace
) -> tuple[dict, list[list[int]]]:
    from lmforge import LLM, SamplingParams

    max_len = max(map(len, prompts)) + max(max_tokens)
    llm = LLM(
        path,
        device=args.device,
        dtype=args.dtype,
        max_model_len=max_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=False,
        async_scheduling=args.async_scheduling,
    )
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in max_tokens]
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # warm-up
    sync(args.device)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    sync(args.device)
    seconds = time.perf_counter() - start
    tokens = [o.outputs[0].token_ids for o in outs]
    return _result(seconds, sum(map(len, tokens)), sum(map(len, prompts))), tokens


def bench_hf(
    path: Path, prompts: list[list[int]], max_tokens: list[int], batch_size: int, args: argparse.Namespace
) -> tuple[dict, list[list[int]]]:
    """HF generate over the requests in arrival order, batch_size at a time (left padding)."""
    from transformers import AutoModelForCausalLM

    model = (
        AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    )

    def batch_inputs(batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(map(len, batch))
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, p in enumerate(batch):
            ids[row, width - len(p) :], mask[row, width - len(p) :] = torch.tensor(p), 1
        return ids.to(args.device), mask.to(args.device)

    tokens: list[list[int]] = []
    with torch.inference_mode():
        ids, mask = batch_inputs(prompts[:2])
        model.generate(
            ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0
        )
        sync(args.device)
        start = time.perf_counter()
        for first in range(0, len(prompts), batch_size):
            batch, wanted = prompts[first : first + batch_size], max_tokens[first : first + batch_size]
            ids, mask = batch_inputs(batch)
            new = max(wanted)
            out = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )
            tokens += [
                row[ids.shape[1] : ids.shape[1] + n] for row, n in zip(out.tolist(), wanted, strict=True)
            ]
        sync(args.device)
    seconds = time.perf_counter() - start
    return _result(seconds, sum(map(len, tokens)), sum(map(len, prompts))), tokens


def _result(seconds: float, generated: int, prompt_tokens: int) -> dict:
    return {
        "seconds": round(seconds, 4),
        "generated_tokens": generated,
        "output_tok_s": round(generated / seconds, 1),
        "total_tok_s": round((generated + prompt_tokens) / seconds, 1),
    }


def workload(args: argparse.Namespace, vocab: int) -> tuple[list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(0)
    if not args.mixed:
        prompts = torch.randint(3, vocab, (args.num_prompts, args.prompt_len), generator=g).tolist()
        return prompts, [args.max_tokens] * args.num_prompts
    lens = torch.randint(16, 257, (args.num_prompts,), generator=g).tolist()
    outs = torch.randint(16, 129, (args.num_prompts,), generator=g).tolist()
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]
    return prompts, outs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
        prompts, max_tokens = workload(args, vocab)
        ours, our_tokens = bench_ours(path, prompts, max_tokens, args)
        print(f"lmforge: {json.dumps(ours)}", file=sys.stderr, flush=True)  # progress: HF runs take long
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
            "workload": "mixed: prompts U[16,256], outputs U[16,128]"
            if args.mixed
            else {"prompt_len": args.prompt_len, "max_tokens": args.max_tokens},
            "async_scheduling": args.async_scheduling,
            "lmforge": ours,
        }
        if not args.skip_hf:
            sizes = args.hf_batch_sizes if args.mixed else [args.num_prompts]
            runs = {}
            for size in sizes:
                hf, hf_tokens = bench_hf(path, prompts, max_tokens, size, args)
                hf["greedy_sequences_identical"] = sum(
                    a == b for a, b in zip(our_tokens, hf_tokens, strict=True)
                )
                runs[size] = hf
            best = max(runs, key=lambda size: runs[size]["output_tok_s"])
            report["hf_by_batch_size"] = runs
            report["hf"] = {"batch_size": best, **runs[best]}
            report["speedup_output_tok_s"] = round(ours["output_tok_s"] / runs[best]["output_tok_s"], 3)
            report["greedy_sequences_identical"] = runs[best]["greedy_sequences_identical"]
        print(json.dumps(report))  # one line, last on stdout (libraries may log above it)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
