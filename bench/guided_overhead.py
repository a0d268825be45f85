"""What guided decoding costs an engine step: decode steps at batch B with no guided row (baseline)
and with one guided row, in the same process on the same model.

    python -m bench.guided_overhead --device cpu --batches 1 64
    python -m bench.guided_overhead --device cuda --dtype bfloat16 --hidden-size 1024 --num-layers 8

A random llama of the given shape with a 32k byte-level BPE (bench/guided_backends.py's, so the
mask has a realistic width) is written to a temp dir. Every row decodes greedily; the guided row
follows bench/guided_backends.AGENT_SCHEMA. Reported per batch size: median step and sampler times
(us) without and with the guided row, the median bitmask fill (llguidance, CPU), and the mask
overhead = fill + the sampler's extra time (whole steps on a shared CPU are too noisy to difference).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.guided_backends import AGENT_SCHEMA, stdlib_tokenizer


def write_model(path: Path, vocab_size: int, hidden_size: int, num_layers: int) -> Path:
    from transformers import AutoModelForCausalLM

    from lmforge.runtime.models.tiny import tiny_hf_config

    tokenizer = stdlib_tokenizer(vocab_size)
    config = tiny_hf_config(
        "llama",
        len(tokenizer),
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=max(1, hidden_size // 64),
        num_kv_heads=max(1, hidden_size // 128),
    )
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 0, 1, None
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run(engine, batch: int, guided: bool, steps: int) -> dict:
    from lmforge.runtime.sampling_params import SamplingParams, StructuredOutputsParams

    fill_s: list[float] = []
    sample_s: list[float] = []
    decoder, runner = engine.runner.guided, engine.runner
    original, sampler = decoder.fill_bitmask, runner.sampler

    def timed_fill(seq_ids):
        start = time.perf_counter()
        result = original(seq_ids)
        fill_s.append(time.perf_counter() - start)
        return result

    def timed_sampler(logits, meta):
        if runner.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = sampler(logits, meta)  # ends with the token ids' copy to the host: synchronous
        sample_s.append(time.perf_counter() - start)
        return result

    decoder.fill_bitmask, runner.sampler = timed_fill, timed_sampler
    plain = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    constrained = SamplingParams(
        max_tokens=steps + 8,
        temperature=0.0,
        structured_outputs=StructuredOutputsParams(json=json.dumps(AGENT_SCHEMA)),
    )
    for i in range(batch):
        engine.add_request(f"r{i}", "def main():", constrained if guided and i == 0 else plain)
    step_s = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        if engine.runner.device.type == "cuda":
            torch.cuda.synchronize()
        step_s.append(time.perf_counter() - start)
        if len(step_s) == steps + 2:  # prefill + warm-up step left out below
            engine.abort_request([f"r{i}" for i in range(batch)])
    decoder.fill_bitmask, runner.sampler = original, sampler
    engine.step()  # deliver the aborts
    decode = step_s[2 : steps + 2]
    return {
        "step_us_median": round(statistics.median(decode) * 1e6, 1),
        "sampler_us_median": round(statistics.median(sample_s[2 : steps + 2]) * 1e6, 1),
        "fill_bitmask_us_median": round(statistics.median(fill_s[2:]) * 1e6, 1) if len(fill_s) > 2 else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from lmforge.runtime.engine.config import EngineArgs
    from lmforge.runtime.engine.llm_engine import LLMEngine

    with tempfile.TemporaryDirectory() as tmp:
        path = write_model(Path(tmp) / "model", args.vocab_size, args.hidden_size, args.num_layers)
        engine = LLMEngine(
            EngineArgs(
                model=path,
                device=args.device,
                dtype=args.dtype,
                max_model_len=512,
                max_num_seqs=max(args.batches),
                num_blocks=max(args.batches) * 8 + 64,
            )
        )
        engine._guided_decoder()  # built once up front: its ~0.5 s tokenizer conversion is not a step
        report = {
            "device": args.device,
            "dtype": args.dtype,
            "vocab_size": engine.model_config.vocab_size,
            "hidden_size": args.hidden_size,
            "num_layers": args.num_layers,
            "steps": args.steps,
        }
        for batch in args.batches:
            base = run(engine, batch, guided=False, steps=args.steps)
            with_guided = run(engine, batch, guided=True, steps=args.steps)
            apply_us = with_guided["sampler_us_median"] - base["sampler_us_median"]
            report[f"batch_{batch}"] = {
                "baseline_step_us": base["step_us_median"],
                "one_guided_row_step_us": with_guided["step_us_median"],
                "baseline_sampler_us": base["sampler_us_median"],
                "one_guided_row_sampler_us": with_guided["sampler_us_median"],
                "fill_bitmask_us": with_guided["fill_bitmask_us_median"],  # llguidance, on the CPU
                "baseline_fill_bitmask_us": base[
                    "fill_bitmask_us_median"
                ],  # 0.0: unguided rows never reach it
                # what the guided row adds to a step: its mask fill + the sampler's bitmask application
                "mask_overhead_us": round(with_guided["fill_bitmask_us_median"] + apply_us, 1),
            }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
