"""GPTQ (Frantar et al. 2022): quantize a Linear's weight column by column, pushing each column's
rounding error onto the columns not yet quantized through the inverse Hessian of the layer's
reconstruction loss ||W X - Q X||^2, H = 2 X X^T / n (X: the layer's calibration inputs).

Shapes: W [out, in]; H [in, in]; group g covers input columns [g*G, (g+1)*G) (as in the checkpoint).
Act-order ("static", llm-compressor's "weight"): columns are processed by decreasing H diagonal, but
every group keeps its scale computed up front from the original weights, so the result uses the plain
group layout and the checkpoint needs no g_idx.
"""

from __future__ import annotations

import torch

from lmforge.runtime.quantize.rtn import int_range, int_scales, store_scale


class HessianAccumulator:
    """Running H = 2/n sum_i x_i x_i^T over every calibration token fed to `add` (fp32)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.num_tokens = 0

    def add(self, x: torch.Tensor) -> None:  # x [..., in]
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        if n == 0:
            return
        total = self.num_tokens + n
        self.hessian *= self.num_tokens / total
        x = x * (2.0 / total) ** 0.5
        self.hessian += x.t() @ x
        self.num_tokens = total


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    dtype: torch.dtype,
    *,
    damp: float = 0.01,
    act_order: bool = True,
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in], hessian [in, in] -> (q [out, in] int8 codes, scale [out, groups] in `dtype`), with
    W_hat = q * scale (groups = in / group_size, or 1 for group_size -1)."""
    out_features, in_features = w.shape
    group = in_features if group_size <= 0 else group_size
    if in_features % group:
        raise ValueError(f"in_features {in_features} is not a multiple of the group size {group}")
    low, high = int_range(bits)
    w = w.detach().float().clone()
    h = hessian.detach().float().clone().to(w.device)

    dead = h.diagonal() == 0  # inputs that never fire: any value is exact, quantize zeros
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    # Scales fixed up front (per channel, or act-order's static groups); else per group, lazily below.
    static = group_size <= 0 or act_order
    scale = (
        int_scales(w, bits, group_size, dtype)
        if static
        else torch.empty(out_features, in_features // group, dtype=dtype, device=w.device)
    )

    perm = torch.argsort(h.diagonal(), descending=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    column_group = (perm if perm is not None else torch.arange(in_features, device=w.device)) // group

    h_inv = _inverse_cholesky(h, damp)

    q = torch.zeros(out_features, in_features, dtype=torch.int8, device=w.device)
    scale_f = scale.float()
    if not static:  # blocks a multiple of the group size: a group's columns are current when it starts
        block_size = group * max(1, block_size // group)
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        w_block = w[:, start:end].clone()
        err_block = torch.zeros_like(w_block)
        h_inv_block = h_inv[start:end, start:end]
        for i in range(end - start):
            col = start + i
            if not static and col % group == 0:
                g = col // group
                scale[:, g] = store_scale(
                    w_block[:, i : i + group].abs().amax(-1) / ((2**bits - 1) / 2), dtype
                )
                scale_f = scale.float()
            s = scale_f[:, column_group[col]]
            column = w_block[:, i]
            q_col = torch.round(column / s).clamp(low, high)
            q[:, col] = q_col.to(torch.int8)
            err = (column - q_col * s) / h_inv_block[i, i]
            w_block[:, i:] -= err[:, None] * h_inv_block[i, i:][None, :]
            err_block[:, i] = err
        w[:, end:] -= err_block @ h_inv[start:end, end:]

    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return q, scale


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1: row i holds the update coefficients
    of column i on the columns after it. Damping grows x10 (up to 3 times) if H is not positive definite."""
    mean_diag = h.diagonal().mean()
    for attempt in range(4):
        damped = h.clone()
        damped.diagonal().add_(damp * 10**attempt * mean_diag)
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
    raise ValueError(
        f"the calibration Hessian is not positive definite even with damping {damp * 1000:g}; "
        "use more calibration samples or a larger --damp"
    )
