"""xgrammar vs llguidance on CPU: JSON-schema compile time and token-mask time per step at a batch.

    python -P -m bench.guided_backends --vocab-size 32000 --batch 64 --steps 32

The measurement that chose lmforge's guided-decoding library (runtime/engine/guided.py). Both
libraries get the same byte-level BPE tokenizer (trained here on the Python standard library's
sources, so the vocabulary has real, long, code-like tokens), the same agent-style JSON schema and
the same walk: every step each of the `batch` rows fills its bitmask row (each library's batched,
multi-threaded fill), then accepts one allowed token drawn with a fixed seed. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import random
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch

AGENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "thought": {"type": "string", "maxLength": 200},
        "action": {"type": "string", "enum": ["search", "lookup", "calculate", "finish"]},
        "arguments": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "limit": {"type": "integer", "minimum": 1, "maximum": 50},
                "filters": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
            },
            "required": ["query"],
            "additionalProperties": False,
        },
        "confidence": {"type": "number"},
        "sources": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"url": {"type": "string"}, "title": {"type": "string"}},
                "required": ["url"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["thought", "action", "arguments"],
    "additionalProperties": False,
}


def stdlib_tokenizer(vocab_size: int):
    """A byte-level BPE of `vocab_size` tokens trained on the stdlib's .py files (a few seconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = sorted(str(p) for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(files, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def allowed_ids(bitmask_row: torch.Tensor, vocab: int) -> list[int]:
    bits = (bitmask_row[:, None] >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten()[:vocab].nonzero().flatten().tolist()


def walk(fill, accept, num_rows: int, steps: int, vocab: int, eos: int, seed: int) -> dict:
    """`steps` steps of fill-all-rows-then-accept; times only the fill (what the sampler waits on)."""
    rng = random.Random(seed)
    bitmask = torch.zeros(num_rows, (vocab + 31) // 32, dtype=torch.int32)
    fill_s, live = [], list(range(num_rows))
    for _ in range(steps):
        if not live:
            break
        start = time.perf_counter()
        fill(bitmask, live)
        fill_s.append(time.perf_counter() - start)
        for row in list(live):
            ids = [t for t in allowed_ids(bitmask[row], vocab) if t != eos] or [eos]
            token = rng.choice(ids)
            accept(row, token)
            if token == eos:
                live.remove(row)
    fill_s.sort()
    return {
        "steps": len(fill_s),
        "fill_us_median": round(fill_s[len(fill_s) // 2] * 1e6, 1),
        "fill_us_mean": round(sum(fill_s) / len(fill_s) * 1e6, 1),
        "per_row_us_median": round(fill_s[len(fill_s) // 2] * 1e6 / num_rows, 2),
    }


def bench_xgrammar(
    tokenizer, vocab: int, schema: str, batch: int, steps: int, seed: int, threads: int
) -> dict:
    import xgrammar as xgr

    start = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    tokenizer_s = time.perf_counter() - start
    compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(schema, any_whitespace=False)
    compile_s = time.perf_counter() - start
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(batch)]
    batcher = xgr.BatchGrammarMatcher(threads)

    def fill(bitmask, rows):
        batcher.batch_fill_next_token_bitmask([matchers[r] for r in rows], bitmask, rows)

    def accept(row, token):
        assert matchers[row].accept_token(token)

    return {
        "version": importlib.metadata.version("xgrammar"),
        "tokenizer_init_ms": round(tokenizer_s * 1e3, 1),
        "compile_ms": round(compile_s * 1e3, 2),
        **walk(fill, accept, batch, steps, vocab, tokenizer.eos_token_id, seed),
    }


def bench_llguidance(
    tokenizer, vocab: int, schema: str, batch: int, steps: int, seed: int, threads: int
) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    start = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    tokenizer_s = time.perf_counter() - start
    start = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    first = llguidance.LLMatcher(lltok, grammar)  # llguidance compiles lazily: the first matcher pays
    compile_s = time.perf_counter() - start
    assert not first.is_error(), first.get_error()
    matchers = [first] + [llguidance.LLMatcher(lltok, grammar) for _ in range(batch - 1)]
    executor = llguidance.LLExecutor(threads)

    def fill(bitmask, rows):
        llguidance.torch.fill_next_token_bitmask_par(executor, [(matchers[r], r) for r in rows], bitmask)

    def accept(row, token):
        assert matchers[row].consume_token(token), matchers[row].get_error()

    return {
        "version": importlib.metadata.version("llguidance"),
        "tokenizer_init_ms": round(tokenizer_s * 1e3, 1),
        "compile_ms": round(compile_s * 1e3, 2),
        **walk(fill, accept, batch, steps, vocab, tokenizer.eos_token_id, seed),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    tokenizer = stdlib_tokenizer(args.vocab_size)
    vocab = len(tokenizer)
    schema = json.dumps(AGENT_SCHEMA)
    report = {"vocab_size": vocab, "batch": args.batch, "threads": args.threads, "schema_bytes": len(schema)}
    for name, fn in (("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance)):
        report[name] = {
            f"batch_{b}": fn(tokenizer, vocab, schema, b, args.steps, args.seed, args.threads)
            for b in sorted({1, args.batch})
        }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
