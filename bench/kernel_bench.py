"""Kernel benchmarks against rooflines (needs a CUDA GPU).

    python -m bench.kernel_bench            # prints one JSON document
    python -m bench.kernel_bench --save     # ... and writes it to bench/results/kernels-<gpu>-<utc time>.json

Sections:
  copy          measured device copy bandwidth (torch copy_ of a 1 GiB buffer): the roofline below
  decode_attn   paged decode attention (Llama-3-8B heads: 32 q / 8 KV, head_dim 128, block 16), bf16 and
                INT8 KV: bytes of K/V (+ scales) read per call / time, as GB/s and as a fraction of copy;
                plus soft cap + 4096 window (bytes of the window only) and ALiBi rows
  gemv          W4A16 (group 128) and W8A16 (per-channel) vs bf16 cuBLAS at batch 1, Llama-3-8B shapes
  rmsnorm       fused residual-add + RMSNorm vs the eager torch reference, hidden 4096
  sampling      top-k/top-p/min-p threshold search + Gumbel-max vs greedy, vocab 128256
Times are medians of triton.testing.do_bench (ms -> us here).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import re
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent


def _bench_us(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


def bench_copy() -> dict:
    nbytes = 1 << 30
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = _bench_us(lambda: dst.copy_(src))
    return {"bytes": nbytes, "us": us, "gbps": 2 * nbytes / us / 1e3}  # read + write


def bench_decode_attention(copy_gbps: float) -> list[dict]:
    from lmforge.kernels.alibi import alibi_slopes
    from lmforge.kernels.decode_attention import paged_decode_attention
    from lmforge.kernels.random_cache import random_paged_cache

    rows = []
    for batch, context in [(1, 8192), (8, 4096), (32, 2048), (64, 1024), (128, 512)]:
        for int8 in (False, True):
            caches, scales, bt, sl = random_paged_cache(
                [context] * batch, 8, 128, 16, torch.bfloat16, "cuda", int8=int8
            )
            q = torch.randn(batch, 32, 128, dtype=torch.bfloat16, device="cuda")
            kw = dict(k_scale_cache=scales[0], v_scale_cache=scales[1])
            us = _bench_us(lambda: paged_decode_attention(q, *caches, bt, sl, 128**-0.5, **kw))  # noqa: B023
            kv_bytes = 2 * batch * context * 8 * 128 * (1 if int8 else 2) + (
                2 * batch * context * 8 * 4 if int8 else 0
            )
            gbps = kv_bytes / us / 1e3
            rows.append({"batch": batch, "context": context, "kv": "int8" if int8 else "bf16", "us": us,
                         "gbps": gbps, "fraction_of_copy": gbps / copy_gbps})  # fmt: skip
    # per-layer score options at batch 8, context 8192: a Gemma2-like local layer reads only its window
    caches, _, bt, sl = random_paged_cache([8192] * 8, 8, 128, 16, torch.bfloat16, "cuda")
    q = torch.randn(8, 32, 128, dtype=torch.bfloat16, device="cuda")
    slopes = alibi_slopes(32).cuda()
    for name, kw in [
        ("softcap50+window4096", dict(logits_soft_cap=50.0, sliding_window=4096)),
        ("alibi", dict(alibi_slopes=slopes)),
    ]:
        us = _bench_us(lambda: paged_decode_attention(q, *caches, bt, sl, 128**-0.5, **kw))  # noqa: B023
        gbps = 2 * 8 * min(8192, kw.get("sliding_window", 8192)) * 8 * 128 * 2 / us / 1e3
        rows.append({"batch": 8, "context": 8192, "kv": "bf16", "options": name, "us": us, "gbps": gbps,
                     "fraction_of_copy": gbps / copy_gbps})  # fmt: skip
    return rows


def bench_gemv() -> list[dict]:
    from lmforge.kernels.quant_gemm import pack_int_weights, quant_linear

    rows = []
    for n, k in [(4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336)]:  # o, qkv, gate_up, down
        x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        bf16_us = _bench_us(lambda: torch.nn.functional.linear(x, w))  # noqa: B023
        for bits, group in ((4, 128), (8, k)):
            half = 1 << (bits - 1)
            packed = pack_int_weights(torch.randint(-half, half, (n, k), device="cuda"), bits)
            scale = torch.rand(n, k // group, dtype=torch.bfloat16, device="cuda") * 0.01
            us = _bench_us(lambda: quant_linear(x, packed, scale, bits))  # noqa: B023
            weight_bytes = packed.numel() * 4 + scale.numel() * 2
            rows.append({"n": n, "k": k, "scheme": f"w{bits}a16-g{group if group != k else 'channel'}", "us": us,
                         "weight_gbps": weight_bytes / us / 1e3, "bf16_us": bf16_us,
                         "bf16_gbps": n * k * 2 / bf16_us / 1e3, "speedup_vs_bf16": bf16_us / us})  # fmt: skip
    return rows


def bench_rmsnorm() -> list[dict]:
    from lmforge.kernels import reference
    from lmforge.kernels.rmsnorm import fused_add_rms_norm

    rows = []
    for num_tokens in (1, 32, 256, 4096):
        x = torch.randn(num_tokens, 4096, dtype=torch.bfloat16, device="cuda")
        r = torch.randn_like(x)
        w = torch.randn(4096, dtype=torch.bfloat16, device="cuda")
        fused = _bench_us(lambda: fused_add_rms_norm(x, r, w, 1e-5))  # noqa: B023
        eager = _bench_us(lambda: reference.fused_add_rms_norm(x, r, w, 1e-5))  # noqa: B023
        moved = 4 * x.numel() * 2  # read x, residual; write out, residual
        rows.append({"tokens": num_tokens, "fused_us": fused, "eager_us": eager, "speedup": eager / fused,
                     "fused_gbps": moved / fused / 1e3})  # fmt: skip
    return rows


def bench_sampling() -> list[dict]:
    from lmforge.kernels.sampling import sample

    rows = []
    vocab = 128256
    for batch in (1, 64):
        logits = torch.randn(batch, vocab, device="cuda") * 4
        uniform = torch.rand(batch, vocab, device="cuda")
        t = torch.full((batch,), 0.8, device="cuda")
        top_k = torch.full((batch,), 50, dtype=torch.int32, device="cuda")
        top_p = torch.full((batch,), 0.9, device="cuda")
        cases = {
            "greedy": lambda: sample(logits, torch.zeros_like(t), uniform=uniform),  # noqa: B023
            "temperature": lambda: sample(logits, t, uniform=uniform),  # noqa: B023
            "top_k+top_p": lambda: sample(logits, t, top_k, top_p, uniform=uniform),  # noqa: B023
            "torch_sort_top_p": lambda: torch.sort(logits, dim=-1, descending=True),  # noqa: B023
        }
        for name, fn in cases.items():
            rows.append({"batch": batch, "vocab": vocab, "case": name, "us": _bench_us(fn)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save", action="store_true", help="write the JSON to bench/results/")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench/kernel_bench.py needs a CUDA GPU (torch.cuda.is_available() is False). "
            "Kernel correctness on CPU is covered by `pytest tests/kernels` (Triton interpreter).",
            file=sys.stderr,
        )
        return 2
    import triton

    torch.manual_seed(0)
    copy = bench_copy()
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "copy": copy,
        "decode_attn": bench_decode_attention(copy["gbps"]),
        "gemv": bench_gemv(),
        "rmsnorm": bench_rmsnorm(),
        "sampling": bench_sampling(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.save:
        out_dir = HERE / "results"
        out_dir.mkdir(exist_ok=True)
        slug = re.sub(r"[^a-z0-9]+", "-", result["device"].lower()).strip("-")
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        path = out_dir / f"kernels-{slug}-{stamp}.json"
        path.write_text(text + "\n")
        print(f"saved {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
