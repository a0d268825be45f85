"""Multi-LoRA batch cost: one batch of rows spread over several adapters vs the same rows on the base model.

    python -m bench.lora_mix                          # CPU: 32 rows over 4 adapters (rank 16) vs 32 base rows
    python -m bench.lora_mix --device cuda --dtype bfloat16 --hidden-size 2048 --num-layers 16
    python -m bench.lora_mix --num-rows 4 --max-tokens 4 --hidden-size 64 --num-layers 1   # smoke run

A real tiny Llama checkpoint of the given width (random widened weights) and PEFT adapters of it on every
q/k/v/o/gate/up/down projection. Three runs in one process, greedy, exactly --max-tokens tokens per row
(ignore_eos), after a warm-up, --repeats times interleaved (the fastest run counts): `base` (an engine without --enable-lora), `lora_engine_base_rows` (the
LoRA engine, no row picks an adapter: the cost of merely enabling LoRA) and `mixed` (row i runs adapter
i % num_adapters, all adapters resident). Output tok/s = generated tokens / wall time of the generate call.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bench import model_shapes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-rows", type=int, default=32)
    p.add_argument("--num-adapters", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed runs per case; the best counts")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    return p.parse_args(argv)


def _timed(llm, prompts: list[list[int]], loras: list, max_tokens: int, device: str) -> tuple[float, int]:
    from lmforge import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    model_shapes.sync(device)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, lora_request=loras)
    model_shapes.sync(device)
    return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outs)


def _best(runs: list[tuple[float, int]]) -> dict:
    seconds, generated = min(runs)
    return {"seconds": round(seconds, 3), "generated_tokens": generated, "output_tok_s": round(generated / seconds, 1),
            "all_seconds": [round(s, 3) for s, _ in runs]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from lmforge import LLM, LoRARequest
    from lmforge.runtime.lora.tiny import LLAMA_ATTENTION, LLAMA_MLP, save_tiny_adapter
    from lmforge.runtime.models.tiny import save_tiny_model

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict = {"benchmark": "lora_mix", **{k: v for k, v in vars(args).items() if k != "threads"},
                    "env": model_shapes.environment(args.device)}  # fmt: skip
    common = dict(device=args.device, dtype=args.dtype, max_model_len=args.prompt_len + args.max_tokens + 8,
                  max_num_seqs=args.num_rows, enable_prefix_caching=False)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        base = save_tiny_model(Path(tmp) / "base", "llama", hidden_size=args.hidden_size, num_layers=args.num_layers,
                               num_heads=max(4, args.hidden_size // 64), num_kv_heads=max(2, args.hidden_size // 128),
                               widen=True)  # fmt: skip
        modules = {
            f"a{i}": str(
                save_tiny_adapter(
                    base,
                    Path(tmp) / f"a{i}",
                    r=args.rank,
                    alpha=2 * args.rank,
                    target_modules=LLAMA_ATTENTION + LLAMA_MLP,
                    seed=i + 1,
                )
            )  # fmt: skip
            for i in range(args.num_adapters)
        }
        vocab = json.loads((base / "config.json").read_text())["vocab_size"]
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, vocab, (args.num_rows, args.prompt_len), generator=gen).tolist()
        none = [None] * args.num_rows
        mixed = [LoRARequest(f"a{i % args.num_adapters}") for i in range(args.num_rows)]
        base_llm = LLM(base, **common)
        lora_llm = LLM(base, **common, enable_lora=True, max_loras=args.num_adapters, max_lora_rank=args.rank,
                       lora_modules=modules)  # fmt: skip
        cases = {
            "base": (base_llm, none),
            "lora_engine_base_rows": (lora_llm, none),
            "mixed": (lora_llm, mixed),
        }
        runs: dict[str, list[tuple[float, int]]] = {name: [] for name in cases}
        for llm, loras in cases.values():  # warm-up
            _timed(llm, prompts, loras, 2, args.device)
        for _ in range(args.repeats):  # interleaved: a noisy (shared) machine slows all three alike
            for name, (llm, loras) in cases.items():
                runs[name].append(_timed(llm, prompts, loras, args.max_tokens, args.device))
        for name in cases:
            report[name] = _best(runs[name])
    report["mixed_vs_base"] = round(report["mixed"]["output_tok_s"] / report["base"]["output_tok_s"], 3)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
