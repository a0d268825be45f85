"""Compile every Triton kernel launch the wrappers make on a GPU, for a GPU target, without a GPU.

    python tests/kernels/compile_check.py [--arch 90 80]

Runs each wrapper with CPU tensors that claim `is_cuda` (so it picks its GPU tile sizes), intercepts
the kernel launch, and compiles it ahead of time down to a cubin with Triton's bundled ptxas. Catches
what the interpreter cannot: tl.dot minimum shapes, illegal globals, loop-carried type mismatches,
shared memory over the device limit. Needs TRITON_INTERPRET unset (a compiled, not interpreted, jit).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
          torch.int32: "i32", torch.int64: "i64", torch.int8: "i8"}  # fmt: skip


class AsCuda(torch.Tensor):
    """A CPU tensor that answers is_cuda=True: the wrappers then choose their GPU launch configs."""

    @property
    def is_cuda(self):
        return True


def cuda_like(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(AsCuda)


def _signature(fn, args, kwargs):
    bound = dict(zip([p.name for p in fn.params], args, strict=False)) | kwargs
    signature, constexprs = {}, {}
    for p in fn.params:
        value = bound[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[p.name] = "*" + DTYPES[value.dtype]
        elif isinstance(value, bool):
            signature[p.name] = "i1"
        elif isinstance(value, int):
            signature[p.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {p.name}={value!r}")
    return signature, constexprs


def run_wrappers() -> None:
    """One call per distinct GPU launch configuration (dtype, INT8, splits, GEMV/GEMM)."""
    from lmforge.kernels import (
        activation,
        decode_attention,
        kv_cache,
        prefill_attention,
        quant_gemm,
        rmsnorm,
        rope,  # fmt: skip
        sampling,
    )
    from lmforge.kernels.quant_pack import pack_int_weights
    from lmforge.kernels.rope_cache import build_rope_cache

    bf16, c = torch.bfloat16, cuda_like
    x = c(torch.randn(4, 4096, dtype=bf16))
    rmsnorm.fused_add_rms_norm(x, x, c(torch.ones(4096, dtype=bf16)), 1e-5)
    rmsnorm.rms_norm(x, c(torch.ones(4096, dtype=bf16)), 1e-5)
    activation.silu_and_mul(c(torch.randn(4, 2 * 14336, dtype=bf16)))
    rope.rope(c(torch.arange(3)), c(torch.randn(3, 32, 128, dtype=bf16)), c(torch.randn(3, 8, 128, dtype=bf16)),
              c(build_rope_cache(128, 16)))  # fmt: skip
    key = c(torch.randn(3, 8, 128, dtype=bf16))
    cache = c(torch.zeros(4, 16, 8, 128, dtype=bf16))
    kv_cache.reshape_and_cache(key, key, cache, cache, c(torch.arange(3)))
    cache8, scale = c(torch.zeros(4, 16, 8, 128, dtype=torch.int8)), c(torch.zeros(4, 16, 8))
    kv_cache.reshape_and_cache_int8(key, key, cache8, cache8, scale, scale, c(torch.arange(3)))
    # the CUDA-graph decode path passes positions and slots as int32 views of one input buffer
    i32 = c(torch.arange(3, dtype=torch.int32))
    rope.rope(i32, c(torch.randn(3, 32, 128, dtype=bf16)), c(torch.randn(3, 8, 128, dtype=bf16)),
              c(build_rope_cache(128, 16)))  # fmt: skip
    kv_cache.reshape_and_cache(key, key, cache, cache, i32)
    kv_cache.reshape_and_cache_int8(key, key, cache8, cache8, scale, scale, i32)

    block_tables, seq_lens = (
        c(torch.zeros(2, 4, dtype=torch.int32)),
        c(torch.full((2,), 3, dtype=torch.int32)),
    )
    cu_seqlens_q = c(torch.tensor([0, 2, 5], dtype=torch.int32))
    for dtype, int8 in ((bf16, False), (bf16, True), (torch.float16, False), (torch.float32, False)):
        kc = c(torch.zeros(8, 16, 8, 128, dtype=torch.int8 if int8 else dtype))
        kv_scale = c(torch.zeros(8, 16, 8))
        kw = dict(k_scale_cache=kv_scale, v_scale_cache=kv_scale) if int8 else {}
        q = c(torch.randn(2, 32, 128, dtype=dtype))
        for num_splits in (1, 4):
            decode_attention.paged_decode_attention(
                q, kc, kc, block_tables, seq_lens, 0.1, num_splits=num_splits, **kw
            )
        q = c(torch.randn(5, 32, 128, dtype=dtype))
        prefill_attention.paged_prefill_attention(
            q, kc, kc, block_tables, seq_lens, cu_seqlens_q, 3, 0.1, **kw
        )
    # per-layer score options (constexpr SOFT_CAP / ALIBI switches, a runtime window): Gemma2- and BLOOM-like
    kc, slopes = c(torch.zeros(8, 16, 8, 128, dtype=bf16)), c(torch.rand(32))
    for opts in (
        dict(logits_soft_cap=50.0, sliding_window=4096),
        dict(alibi_slopes=slopes),
        dict(alibi_slopes=slopes, logits_soft_cap=30.0, sliding_window=7),
    ):
        for num_splits in (1, 4):
            decode_attention.paged_decode_attention(
                c(torch.randn(2, 32, 128, dtype=bf16)),
                kc,
                kc,
                block_tables,
                seq_lens,
                0.1,
                num_splits=num_splits,
                **opts,
            )
        prefill_attention.paged_prefill_attention(
            c(torch.randn(5, 32, 128, dtype=bf16)),
            kc,
            kc,
            block_tables,
            seq_lens,
            cu_seqlens_q,
            3,
            0.1,
            **opts,
        )

    logits = c(torch.randn(2, 1000))
    ones = c(torch.ones(2))
    sampling.sample(logits, ones, c(torch.ones(2, dtype=torch.int32)), ones, c(torch.zeros(2)))
    sampling.sample(logits, ones)
    for bits, group in ((4, 128), (8, 4096)):
        packed = c(pack_int_weights(torch.zeros(256, 4096, dtype=torch.int64), bits))
        scales = c(torch.ones(256, 4096 // group, dtype=bf16))
        for m in (1, 64):
            quant_gemm.quant_linear(
                c(torch.randn(m, 4096, dtype=bf16)), packed, scales, bits, c(torch.zeros(256, dtype=bf16))
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch", type=int, nargs="+", default=[90], help="CUDA compute capabilities, e.g. 90 80"
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (it needs compiled jit functions)", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    failures, seen = [], set()

    def compile_launch(self, *launch_args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        signature, constexprs = _signature(self, launch_args, kwargs)
        key = (self.__name__, tuple(sorted(signature.items())), tuple(sorted(map(str, constexprs.items()))))
        if key in seen:
            return
        seen.add(key)
        config = {k: v for k, v in constexprs.items() if k.isupper()}
        for arch in args.arch:
            source = ASTSource(fn=self, signature=signature, constexprs=constexprs)
            try:
                kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
            except Exception as exc:  # report all, fail at the end
                failures.append(f"sm_{arch} {self.__name__} {config}: {str(exc)[-2000:]}")
                continue
            smem = kernel.metadata.shared
            status = "ok" if smem <= SMEM_LIMIT.get(arch, 99 * 1024) else "SHARED MEMORY OVER LIMIT"
            if status != "ok":
                failures.append(f"sm_{arch} {self.__name__} {config}: shared memory {smem} B")
            print(f"sm_{arch} {self.__name__} {config} smem={smem} {status}", flush=True)

    original_run = JITFunction.run
    JITFunction.run = compile_launch
    try:
        run_wrappers()
    finally:
        JITFunction.run = original_run
    for failure in failures:
        print("FAILED", failure, file=sys.stderr)
    print(f"compiled {len(seen)} launch configurations for sm_{args.arch}: {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
