"""The engine's host path alone: µs per decode step outside the model.

The real scheduler, block manager, input preparation, sampler and output processing (stop checks,
detokenization, RequestOutput) run around a model whose forward does nothing and whose LM head
returns fixed logits of the real shape [N, vocab] (each row's argmax a different ordinary token).
What is left of a step is what a GPU step would have to hide.

For each batch size: B requests of `--prompt-len` tokens are prefilled, then `--steps` decode steps
are timed one by one. Reported per batch: the median (and min) µs per step and the median of each phase
(medians: the machine is shared, and a mean follows its worst interruptions):
    schedule  Scheduler.schedule (block allocation included)
    prepare   ModelRunner.execute minus forward and sampling (input tensors, attention metadata,
              sampling metadata)
    forward   the no-op model (a floor: reading fixed tensors)
    sample    Sampler (greedy: argmax over [B, vocab] + copying the ids out)
    output    the rest of LLMEngine.step (update, stop checks, detokenizer, outputs)
CPU only by design: `python -m bench.engine_overhead [--batches 1 32 256]`.

`--timeline-forward-ms F` adds the async-scheduling check: the no-op forward sleeps F ms (a device
step of known duration), the same decode run goes once synchronously and once with
`async_scheduling=True`, and every host span (schedule, prepare, output) and forward span is recorded
with its thread. Reported: ms per step both ways, the share of host time spent inside a forward
(with async scheduling the host work of step n+1 runs while step n's forward does), and the spans of
a few steps.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench import model_shapes

PHASES = ("schedule", "prepare", "forward", "sample", "output")


class NoOpModel(nn.Module):
    """Stands in for the model: forward returns a [T, 1] zero tensor, compute_logits fixed logits."""

    def __init__(
        self,
        real: nn.Module,
        vocab: int,
        max_rows: int,
        timer: dict[str, float],
        forward_s: float = 0.0,
        spans: list[tuple[str, float, float]] | None = None,
    ):
        super().__init__()
        self.forward_s, self.spans = forward_s, spans
        self.real = real  # keeps attention_layers() (the KV cache binding) and sliding windows
        gen = torch.Generator().manual_seed(0)
        logits = torch.randn(max_rows, vocab, generator=gen)
        logits[torch.arange(max_rows), 3 + torch.arange(max_rows) % 200] = 50.0  # ordinary tokens
        self.logits, self.hidden = logits, torch.zeros(max_rows * 1024, 1)
        self.timer = timer

    def attention_layers(self) -> Any:
        return self.real.attention_layers()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: Any) -> torch.Tensor:
        start = time.perf_counter()
        out = self.hidden[: input_ids.shape[0]]
        if self.forward_s:
            time.sleep(self.forward_s)  # a device step of known duration (releases the GIL, like a GPU)
        end = time.perf_counter()
        self.timer["forward"] += end - start
        if self.spans is not None:
            self.spans.append(("forward", start, end))
        return out

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.logits[: hidden.shape[0]]
        self.timer["forward"] += time.perf_counter() - start
        return out


class _TimedSampler:
    def __init__(self, sampler: Any, timer: dict[str, float]):
        self.sampler, self.timer = sampler, timer

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sampler, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = self.sampler(*args, **kwargs)
        self.timer["sample"] += time.perf_counter() - start
        return out


def _timed(fn: Any, timer: dict[str, float], key: str) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        timer[key] += time.perf_counter() - start
        return out

    return wrapper


def _spanned(fn: Any, spans: list[tuple[str, float, float]], name: str) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        spans.append((name, start, time.perf_counter()))
        return out

    return wrapper


def build_engine(
    path: Path,
    max_num_seqs: int,
    max_model_len: int,
    forward_s: float = 0.0,
    spans: list[tuple[str, float, float]] | None = None,
    **engine_kwargs: Any,
) -> tuple[Any, dict]:
    from lmforge.runtime.engine.config import EngineArgs
    from lmforge.runtime.engine.llm_engine import LLMEngine

    engine = LLMEngine(
        EngineArgs(
            model=path,
            load_format="dummy",
            device="cpu",
            dtype="float32",
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max(8192, max_num_seqs * max_model_len),
            num_blocks=max_num_seqs * (-(-max_model_len // 16)) + 8,
            enable_prefix_caching=False,
            **engine_kwargs,
        )
    )
    timer: dict[str, float] = defaultdict(float)
    runner = engine.runner
    vocab = engine.model_config.vocab_size
    runner.model = NoOpModel(runner.model, vocab, max_num_seqs, timer, forward_s, spans)
    runner.sampler = _TimedSampler(runner.sampler, timer)
    if spans is not None:  # the timeline: host spans by name (wrappers on the instances)
        engine.scheduler.schedule = _spanned(engine.scheduler.schedule, spans, "schedule")
        runner._host_step = _spanned(runner._host_step, spans, "prepare")
        engine._process_result = _spanned(engine._process_result, spans, "output")
        return engine, timer
    engine.scheduler.schedule = _timed(engine.scheduler.schedule, timer, "schedule")
    runner.execute = _timed(runner.execute, timer, "execute")
    return engine, timer


def timeline(path: Path, batch: int, prompt_len: int, steps: int, forward_ms: float) -> dict:
    """The same decode run synchronously and with async scheduling, around a forward of forward_ms."""
    from lmforge.runtime.sampling_params import SamplingParams

    report: dict[str, Any] = {"batch": batch, "forward_ms": forward_ms}
    for mode in ("sync", "async"):
        spans: list[tuple[str, float, float]] = []
        engine, _ = build_engine(
            path,
            batch,
            prompt_len + steps + 32,
            forward_s=forward_ms / 1e3,
            spans=spans,
            async_scheduling=mode == "async",
        )
        params = SamplingParams(max_tokens=steps + 4, temperature=0.0, ignore_eos=True)
        for i in range(batch):
            engine.add_request(f"r{i}", [3 + (i + j) % 200 for j in range(prompt_len)], params)
        for _ in range(3):
            engine.step()
        spans.clear()
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        elapsed = time.perf_counter() - start
        while engine.has_unfinished_requests():
            engine.step()
        forwards = [(a, b) for name, a, b in spans if name == "forward"]
        host = [(name, a, b) for name, a, b in spans if name != "forward" and a >= start]
        inside = sum(_overlap(a, b, forwards) for _, a, b in host)
        total = sum(b - a for _, a, b in host)
        shown = [(n, a, b) for n, a, b in spans if a >= start][:12]
        report[mode] = {
            "ms_per_step": round(elapsed / steps * 1e3, 3),
            "host_ms_per_step": round(total / steps * 1e3, 3),
            "host_inside_forward": round(inside / total, 3) if total else 0.0,
            "spans_ms": [(n, round((a - start) * 1e3, 3), round((b - start) * 1e3, 3)) for n, a, b in shown],
        }
        del engine
        model_shapes.release_memory("cpu")
    return report


def _overlap(a: float, b: float, intervals: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(b, y) - max(a, x)) for x, y in intervals)


def measure(engine: Any, timer: dict[str, float], batch: int, prompt_len: int, steps: int) -> dict:
    from lmforge.runtime.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"r{i}", [3 + (i + j) % 200 for j in range(prompt_len)], params)
    while any(seq.num_computed_tokens < seq.num_prompt_tokens for seq in _seqs(engine)):
        engine.step()  # prefill (and the first decode steps), not timed
    for _ in range(3):
        engine.step()
    samples: dict[str, list[float]] = defaultdict(list)
    per_step = []
    for _ in range(steps):
        timer.clear()
        start = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - start
        per_step.append(elapsed)
        phases = {
            "schedule": timer["schedule"],
            "prepare": timer["execute"] - timer["forward"] - timer["sample"],
            "forward": timer["forward"],
            "sample": timer["sample"],
            "output": elapsed - timer["schedule"] - timer["execute"],
        }
        for key, value in phases.items():
            samples[key].append(value)
    tokens = {len(seq.output_token_ids) for seq in _seqs(engine)}
    engine.abort_request([f"r{i}" for i in range(batch)])
    engine.step()
    if len(tokens) != 1:
        raise RuntimeError(f"requests advanced unevenly: {sorted(tokens)} tokens")
    return {
        "batch": batch,
        "tokens_per_request": tokens.pop(),
        "us_per_step": round(statistics.median(per_step) * 1e6, 1),
        "us_per_step_min": round(min(per_step) * 1e6, 1),
        "us_per_step_mean": round(statistics.fmean(per_step) * 1e6, 1),
        "phases_us": {key: round(statistics.median(samples[key]) * 1e6, 1) for key in PHASES},
    }


def _seqs(engine: Any) -> list[Any]:
    return [seq for req in engine.requests.values() for seq in req.seqs]


def main(argv: list[str] | None = None) -> int:
    p = model_shapes.argument_parser(__doc__)
    p.set_defaults(shape="llama-512x8", device="cpu", dtype="float32")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=0, help="timed decode steps per batch (0: by batch size)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--timeline-forward-ms", type=float, default=0.0, help="also the async timeline (forward of F ms)"
    )
    p.add_argument("--timeline-batch", type=int, default=32)
    args = p.parse_args(argv)
    if args.device != "cpu":
        p.error("the host path is measured on CPU (--device cpu)")
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        path = model_shapes.write_shape(Path(tmp) / "model", args.shape, 4096)
        for batch in args.batches:
            steps = args.steps or max(20, min(300, 3000 // batch))
            engine, timer = build_engine(path, batch, args.prompt_len + steps + 32)
            results.append(measure(engine, timer, batch, args.prompt_len, steps))
            del engine
            model_shapes.release_memory("cpu")
        overlap = None
        if args.timeline_forward_ms > 0:
            overlap = timeline(path, args.timeline_batch, args.prompt_len, 30, args.timeline_forward_ms)
    report = {
        "bench": "engine_overhead",
        "shape": args.shape,
        "prompt_len": args.prompt_len,
        "results": results,
        "timeline": overlap,
        "env": model_shapes.environment("cpu"),
    }
    import json

    print(json.dumps(report))
    if args.save:
        model_shapes.save(report, "engine_overhead")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
