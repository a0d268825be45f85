"""Fused MoE layer (kernels/fused_moe.py) vs the torch loop over experts (kernels/moe_reference.py), one
MoE layer's experts at Mixtral-8x7B shapes (8 experts, top-2, hidden 4096, expert intermediate 14336).

    python -m bench.moe [--w4a16]                         # CUDA: batch 1, 16, 256 tokens, bf16; one JSON document
    python -m bench.moe --device cpu --shape tiny         # smoke run (set TRITON_INTERPRET=1 for the kernel)

Both sides get the same tokens, router choices (softmax top-2 of random logits, renormalised, as Mixtral
routes) and weights, and must agree (max |diff| is reported). Times are medians over --repeats calls after
a warm-up, in the same process; `weight_gbps` is the expert weight bytes a call must read (only the
experts some token chose) over the fused time: at batch 1 the layer is a weight stream, so that figure
against the device's copy bandwidth says how close it is to the roofline.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import re
import statistics
import sys
import time
from collections.abc import Callable

import torch

SHAPES = {
    "mixtral-8x7b": dict(experts=8, top_k=2, hidden=4096, intermediate=14336),
    "tiny": dict(experts=4, top_k=2, hidden=64, intermediate=96),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", choices=sorted(SHAPES), default="mixtral-8x7b")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--batches", default="1,16,256", help="token counts, comma-separated")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument(
        "--w4a16", action="store_true", help="also time W4A16 (group 128) experts in the same kernel"
    )
    p.add_argument("--save", action="store_true", help="write the JSON to bench/results/")
    return p.parse_args(argv)


def _median_ms(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()  # warm-up (Triton compiles on the first call)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def packed_experts(rows: int, cols: int, experts: int, bits: int, group: int, dtype: torch.dtype,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Random pack-quantized experts: codes [E, rows, cols*bits/32] int32, scales [E, rows, cols/group]."""
    from lmforge.kernels.quant_pack import pack_int_weights

    gen = torch.Generator(device=device).manual_seed(1)
    half = 1 << (bits - 1)
    packed = torch.empty(experts, rows, cols * bits // 32, dtype=torch.int32, device=device)
    for e in range(experts):
        packed[e] = pack_int_weights(
            torch.randint(-half, half, (rows, cols), generator=gen, device=device), bits
        )
    scale = (torch.rand(experts, rows, cols // group, generator=gen, device=device) * 0.01 / cols**0.5).to(
        dtype
    )
    return packed, scale


def bench_batch(
    weights: tuple[torch.Tensor, torch.Tensor],
    shape: dict,
    num_tokens: int,
    repeats: int,
    quantized: tuple[torch.Tensor, ...] | None = None,
) -> dict:
    from lmforge.kernels import moe_reference
    from lmforge.kernels.fused_moe import fused_moe, fused_moe_quant

    w13, w2 = weights
    device, dtype = w13.device, w13.dtype
    gen = torch.Generator(device="cpu").manual_seed(num_tokens)
    x = (torch.randn(num_tokens, shape["hidden"], generator=gen) * 0.5).to(device, dtype)
    logits = torch.randn(num_tokens, shape["experts"], generator=gen).to(device)
    top_weights, top_ids = logits.softmax(-1).topk(shape["top_k"], dim=-1)
    top_weights = top_weights / top_weights.sum(-1, keepdim=True)
    fused_ms = _median_ms(lambda: fused_moe(x, w13, w2, top_weights, top_ids), repeats, device)
    loop_ms = _median_ms(lambda: moe_reference.fused_moe(x, w13, w2, top_weights, top_ids), repeats, device)
    diff = (fused_moe(x, w13, w2, top_weights, top_ids).float()
            - moe_reference.fused_moe(x, w13, w2, top_weights, top_ids).float()).abs().max().item()  # fmt: skip
    used = int(torch.unique(top_ids).numel())
    per_expert_bytes = (w13[0].numel() + w2[0].numel()) * w13.element_size()
    row = {
        "tokens": num_tokens,
        "experts_used": used,
        "fused_ms": fused_ms,
        "torch_loop_ms": loop_ms,
        "speedup": loop_ms / fused_ms,
        "weight_gbps": used * per_expert_bytes / fused_ms / 1e6,
        "max_abs_diff": diff,
    }
    if quantized is not None:  # W4A16 experts (group 128) through the same kernel
        q13, s13, q2, s2 = quantized
        quant_ms = _median_ms(
            lambda: fused_moe_quant(x, q13, s13, q2, s2, 4, top_weights, top_ids), repeats, device
        )
        packed_bytes = sum(t[0].numel() * t.element_size() for t in quantized)
        row.update(w4a16_fused_ms=quant_ms, w4a16_weight_gbps=used * packed_bytes / quant_ms / 1e6)
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/moe.py needs a CUDA GPU (or --device cpu --shape tiny for a smoke run)", file=sys.stderr)
        return 2
    shape, dtype = SHAPES[args.shape], getattr(torch, args.dtype)
    if device.type == "cpu":
        from lmforge.kernels._interp import interpreting, patch_bf16

        if not interpreting():
            print("bench/moe.py on CPU runs the kernel in the Triton interpreter: set TRITON_INTERPRET=1",
                  file=sys.stderr)  # fmt: skip
            return 2
        patch_bf16()
    gen = torch.Generator(device=device).manual_seed(0)
    e, h, i = shape["experts"], shape["hidden"], shape["intermediate"]
    # drawn one expert at a time on the device: the Mixtral layer is 3 x 8 x 4096 x 14336 bf16 = 2.8 GB
    w13 = torch.empty(e, 2 * i, h, dtype=dtype, device=device)
    w2 = torch.empty(e, h, i, dtype=dtype, device=device)
    for expert in range(e):
        w13[expert].copy_(torch.randn(2 * i, h, generator=gen, device=device) / h**0.5)
        w2[expert].copy_(torch.randn(h, i, generator=gen, device=device) / i**0.5)
    quantized = None
    if args.w4a16:
        group = 128 if h % 128 == 0 and i % 128 == 0 else 32  # tiny: 32
        quantized = (
            *packed_experts(2 * i, h, e, 4, group, dtype, device),
            *packed_experts(h, i, e, 4, group, dtype, device),
        )
    rows = [bench_batch((w13, w2), shape, int(b), args.repeats, quantized) for b in args.batches.split(",")]
    report = {
        "benchmark": "moe",
        "shape": {"name": args.shape, **shape},
        "dtype": args.dtype,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)",
        "rows": rows,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.save:
        out_dir = pathlib.Path(__file__).resolve().parent / "results"
        out_dir.mkdir(exist_ok=True)
        slug = re.sub(r"[^a-z0-9]+", "-", report["device"].lower()).strip("-")
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        path = out_dir / f"moe-{slug}-{stamp}.json"
        path.write_text(text + "\n")
        print(f"saved {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
