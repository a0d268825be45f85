"""Fused kernels for the runtime (Triton) and their torch references.

Use `lmforge.kernels.backend.get_ops(device)`; this package imports nothing (triton stays lazy).
One kernel per module: rmsnorm, activation, rope (+ rope_cache), kv_cache, decode_attention,
prefill_attention, sampling, quant_gemm (+ quant_pack). reference.py holds every torch reference.
"""
