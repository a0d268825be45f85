"""Running the Triton kernels on CPU through the Triton interpreter (TRITON_INTERPRET=1).

The interpreter (triton 3.9) keeps bf16 values as raw uint16 bits, which breaks two things the
kernels use: `tl.dot` on bf16 operands (numpy multiplies the bit patterns) and fp32 -> bf16
casts (truncated instead of rounded to nearest even as on the GPU). The kernels only do arithmetic
in fp32 (bf16 is loaded, converted, and cast back for stores and dots), so `patch_bf16()` fixes
exactly those two builder ops. Compiled (GPU) kernels are untouched; nothing here runs unless the
interpreter is on.
"""

from __future__ import annotations

import os


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def patch_bf16() -> None:
    """Idempotent; call before running kernels in the interpreter."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_lmforge_bf16_patched", False):
        return
    original_dot, original_cast = builder.create_dot, builder.cast_impl

    def create_dot(self, a, b, d, *args, **kwargs):
        if a.dtype.scalar == tl.bfloat16:
            a = self.cast_impl(a, tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = self.cast_impl(b, tl.float32)
        return original_dot(self, a, b, d, *args, **kwargs)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest, ties to even
            nan = np.isnan(src.data)
            out = np.where(nan, 0x7FC0, rounded).astype(np.uint16)
            return interpreter.TensorHandle(out, tl.bfloat16)
        return original_cast(self, src, dst_type)

    builder.create_dot = create_dot
    builder.cast_impl = cast_impl
    builder._lmforge_bf16_patched = True
