"""RoPE frequency tables for every rope type the engine serves, each equal to transformers' own.

Torch only, no Triton: the model builds its tables once on any device; `rope.py` (Triton) and
`reference.rope` read them. A table row holds one rotation:

    cos_sin [rows, rotary_dim] fp32: columns [0, rotary_dim/2) hold cos(pos * inv_freq) * attention_factor,
    columns [rotary_dim/2, rotary_dim) hold sin(pos * inv_freq) * attention_factor.

HF multiplies cos and sin by the rope type's attention factor (yarn, longrope) before rotating q and
k, so the factor lives in the table and the kernels never see it (q.k picks it up squared, as in HF).

Rope types (`rope_scaling["rope_type"]`, or the older key "type"), as in
`transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS`:
    default, linear, llama3, yarn - the rotation depends on the position only: one table [P, R], row = position.
    longrope (alias su)            - HF rotates every token of a forward with the long factors when that
                                     forward's sequence is longer than original_max_position_embeddings:
                                     two tables stacked [2P, R] (short rows, then long), see `longrope_rows`.
    dynamic                        - HF recomputes the base from the sequence length once it exceeds
                                     max_position_embeddings: a table of inverse frequencies per sequence
                                     length [P, R/2] (`dynamic_inv_freq_table`), cos/sin built per token.

"The sequence length HF saw" for a token is `hf_seq_lens`: HF computes a prompt in one forward (every
prompt token sees the prompt length) and each generated token in its own (it sees position + 1).
Bit-identity: every inverse frequency repeats transformers' op order in fp32, so the angles
(pos * inv_freq, up to 1e5 rad) round the same way and cos/sin agree to fp32 rounding at any position.
Like HF's rotary init, the frequencies are computed on the CPU in fp32 whatever the default device and
dtype (the model runner builds models under `torch.device(cuda)` and a bf16 default dtype); only dynamic
NTK's per-length rows are computed on the served device, where HF recomputes them in forward. Tables
land on `device` (default: the current default device).
"""

from __future__ import annotations

import math
from typing import Any

import torch

POSITION_ONLY_TYPES = ("default", "linear", "llama3", "yarn")
LENGTH_DEPENDENT_TYPES = ("longrope", "dynamic")
ROPE_TYPES = POSITION_ONLY_TYPES + LENGTH_DEPENDENT_TYPES
_ALIASES = {"su": "longrope"}  # Phi-3 checkpoints before transformers renamed it
_COMMON_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
_TYPE_KEYS = {  # every key that changes the math of that type (HF's required + optional keys)
    "default": set(),
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
             "attention_factor", "truncate"},
    "longrope": {"short_factor", "long_factor", "original_max_position_embeddings", "factor", "attention_factor"},
    "dynamic": {"factor", "original_max_position_embeddings"},
}  # fmt: skip
_REQUIRED = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
             "yarn": ("factor",), "longrope": ("short_factor", "long_factor"), "dynamic": ("factor",)}  # fmt: skip


def rope_type_of(rope_scaling: dict[str, Any] | None) -> str:
    """The canonical rope type of a rope_scaling dict; unknown types raise ValueError naming them."""
    scaling = rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    rope_type = _ALIASES.get(rope_type, rope_type)
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"rope_scaling rope_type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
        )
    return rope_type


def validate_rope_scaling(rope_scaling: dict[str, Any] | None, max_position_embeddings: int | None = None
                          ) -> dict[str, Any]:  # fmt: skip
    """Checks every key of rope_scaling and returns it normalized: canonical "rope_type", and the default
    transformers fills in for yarn/longrope (factor None <- max_position_embeddings /
    original_max_position_embeddings). llama3/yarn/longrope must carry original_max_position_embeddings.

    Raises ValueError naming the rope_type and the key for an unknown key, a missing required key, or a
    value the engine cannot serve exactly as HF does. max_position_embeddings: HF config's top-level value.
    """
    scaling = dict(rope_scaling or {})
    rope_type = rope_type_of(scaling)
    _check_keys(scaling, rope_type)
    scaling.pop("type", None)
    scaling["rope_type"] = rope_type

    _fill_defaults(scaling, rope_type, max_position_embeddings)
    _check_numbers(scaling, rope_type)
    return scaling


def _check_keys(scaling: dict[str, Any], rope_type: str) -> None:
    """Unknown keys, missing or null required keys, and longrope's factor lists."""
    unknown = sorted(set(scaling) - _COMMON_KEYS - _TYPE_KEYS[rope_type])
    if unknown:
        raise ValueError(f"rope_scaling key {unknown[0]!r} (={scaling[unknown[0]]!r}) is not supported with "
                         f"rope_type {rope_type!r} (keys read: {sorted(_TYPE_KEYS[rope_type])})")  # fmt: skip
    for key in _REQUIRED.get(rope_type, ()):
        if key not in scaling:
            raise ValueError(f"rope_scaling with rope_type {rope_type!r} needs the key {key!r}")
        if scaling[key] is None and not (rope_type == "yarn" and key == "factor"):  # yarn: None has a meaning
            raise ValueError(f"rope_scaling {key!r} of rope_type {rope_type!r} is null")
    for key in ("short_factor", "long_factor"):
        value = scaling.get(key)
        if value is not None and not (
            isinstance(value, list | tuple)
            and all(isinstance(x, int | float) and not isinstance(x, bool) for x in value)
        ):
            raise ValueError(
                f"rope_scaling {key!r} must be a list of numbers for rope_type 'longrope', got {value!r}"
            )


def _fill_defaults(scaling: dict[str, Any], rope_type: str, max_position_embeddings: int | None) -> None:
    """transformers' defaults, in place: yarn/longrope factor from the lengths, dynamic's threshold
    (original_max_position_embeddings <- max_position_embeddings); refuses what only the config
    reader could fill in."""

    def need_mpe(what: str) -> int:
        if max_position_embeddings is None:
            raise ValueError(
                f"rope_type {rope_type!r}: {what} needs max_position_embeddings (the HF config's)"
            )
        return max_position_embeddings

    if (
        rope_type in ("llama3", "yarn", "longrope")
        and scaling.get("original_max_position_embeddings") is None
    ):
        # transformers takes it from the config's top level when the config class has that attribute
        # (Phi-3), else from max_position_embeddings: only the config reader knows which, so it must say
        raise ValueError(
            f"rope_scaling with rope_type {rope_type!r} needs 'original_max_position_embeddings' "
            "(fold in the config's top-level original_max_position_embeddings, as transformers' "
            "standardize_rope_params does, or max_position_embeddings where the model has none)"
        )
    if (
        rope_type in ("yarn", "longrope")
        and scaling.get("factor") is None
        and (rope_type == "yarn" or scaling.get("attention_factor") is None)
    ):
        scaling["factor"] = need_mpe("factor=None") / scaling["original_max_position_embeddings"]
    if rope_type == "dynamic":  # normalized: original_max_position_embeddings holds HF's threshold
        omp = scaling.get("original_max_position_embeddings")
        mpe = scaling["original_max_position_embeddings"] = need_mpe("its length threshold")
        if (
            omp is not None and omp != mpe
        ):  # HF's dynamic NTK never reads it: a checkpoint that sets it expects something else
            raise ValueError(f"rope_type 'dynamic': original_max_position_embeddings={omp!r} differs from "
                             f"max_position_embeddings={mpe}; transformers' dynamic NTK scales from "
                             "max_position_embeddings and ignores the key, so its meaning is ambiguous")  # fmt: skip


def _check_numbers(scaling: dict[str, Any], rope_type: str) -> None:
    """Numeric keys are numbers (a bool is not), yarn's truncate a bool."""
    for key in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "mscale",
                "mscale_all_dim", "attention_factor"):  # fmt: skip
        value = scaling.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError(
                f"rope_scaling {key!r} must be a number for rope_type {rope_type!r}, got {value!r}"
            )
    if "truncate" in scaling and not isinstance(scaling["truncate"], bool):
        raise ValueError(f"rope_scaling 'truncate' must be true or false for rope_type 'yarn', got "
                         f"{scaling['truncate']!r}")  # fmt: skip


def _base_inv_freq(rotary_dim: int, base: float) -> torch.Tensor:
    """1 / base^(2i/R), HF's op order (int64 arange -> fp32 -> / dim; python-float base ** tensor)."""
    if rotary_dim % 2 or rotary_dim <= 0:
        raise ValueError(f"rotary_dim must be even and positive, got {rotary_dim}")
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").to(torch.float) / rotary_dim
    return 1.0 / (base**exponents)


def compute_inv_freq(rotary_dim: int, base: float, rope_scaling: dict[str, Any] | None = None, *,
                     max_position_embeddings: int | None = None) -> torch.Tensor:  # fmt: skip
    """inv_freq [rotary_dim/2] fp32, bit-identical to transformers' ROPE_INIT_FUNCTIONS at init.

    For the length-dependent types this is HF's init-time set, used while the sequence is short:
    longrope's short factors, dynamic's unscaled frequencies.
    """
    scaling = validate_rope_scaling(rope_scaling, max_position_embeddings)
    rope_type = scaling["rope_type"]
    if rope_type == "linear":
        return _base_inv_freq(rotary_dim, base) / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(_base_inv_freq(rotary_dim, base), scaling)
    if rope_type == "yarn":
        return _yarn_inv_freq(rotary_dim, base, scaling)
    if rope_type == "longrope":
        return longrope_inv_freq(rotary_dim, base, scaling["short_factor"])
    if rope_type == "dynamic":
        return _dynamic_init_inv_freq(
            rotary_dim, base, scaling["factor"], scaling["original_max_position_embeddings"]
        )
    return _base_inv_freq(rotary_dim, base)


def _dynamic_init_inv_freq(rotary_dim: int, base: float, factor: float, max_position_embeddings: int
                           ) -> torch.Tensor:  # fmt: skip
    """HF's dynamic-NTK set at init (seq_len = max_position_embeddings, in python floats): the ratio is 1
    up to float64 rounding, kept exactly as HF computes it."""
    mpe = max_position_embeddings
    return _base_inv_freq(
        rotary_dim, base * ((factor * mpe / mpe) - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))
    )


def attention_factor(
    rope_scaling: dict[str, Any] | None, max_position_embeddings: int | None = None
) -> float:
    """The factor HF multiplies cos and sin by (yarn: mscale; longrope: sqrt(1 + ln s / ln L); else 1)."""
    scaling = validate_rope_scaling(rope_scaling, max_position_embeddings)
    rope_type = scaling["rope_type"]
    if scaling.get("attention_factor") is not None:
        return scaling["attention_factor"]
    if rope_type in ("yarn", "longrope"):
        factor = float(scaling["factor"])  # validate_rope_scaling filled it in
    if rope_type == "yarn":
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            return float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
        return _yarn_mscale(factor)
    if rope_type == "longrope":
        if factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(factor) / math.log(scaling["original_max_position_embeddings"]))
    return 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature (paper eq. 21): 0.1 * mscale * ln(scale) + 1."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by `factor`, blend smoothly in between."""
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor  # longer wavelengths than this: fully scaled
    high_freq_wavelen = old_context_len / high_freq_factor  # shorter than this: untouched

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


def _yarn_inv_freq(rotary_dim: int, base: float, scaling: dict[str, Any]) -> torch.Tensor:
    """YaRN: interpolate (divide by factor) the dims that rotate fewer than beta_slow times over the
    original context, extrapolate (keep) those rotating more than beta_fast times, ramp linearly between."""
    factor = scaling["factor"]
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1
    original_len = scaling["original_max_position_embeddings"]

    def correction_dim(num_rotations: float) -> float:  # the dim index that turns num_rotations times
        return (rotary_dim * math.log(original_len / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # HF: avoid a zero-width ramp
    ramp = torch.clamp(
        (torch.arange(rotary_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1
    )

    pos_freqs = base ** (torch.arange(0, rotary_dim, 2, device="cpu").to(dtype=torch.float) / rotary_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1: extrapolate (high frequency), 0: interpolate
    return interpolation * (1 - keep) + extrapolation * keep


def longrope_inv_freq(rotary_dim: int, base: float, ext_factors: list[float]) -> torch.Tensor:
    """LongRoPE (Phi-3): each frequency divided by its own rescale factor (short or long list)."""
    if len(ext_factors) != rotary_dim // 2:
        raise ValueError(f"rope_type 'longrope': short_factor/long_factor need rotary_dim/2 = {rotary_dim // 2} "
                         f"values, got {len(ext_factors)}")  # fmt: skip
    factors = torch.tensor(ext_factors, dtype=torch.float32, device="cpu")
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float() / rotary_dim
    return 1.0 / (factors * base**exponents)


def dynamic_inv_freq_table(rotary_dim: int, base: float, factor: float, max_position_embeddings: int,
                           max_positions: int, device: torch.device | str | None = None) -> torch.Tensor:  # fmt: skip
    """[max_positions, rotary_dim/2] fp32: row s-1 holds HF's dynamic-NTK inv_freq for a sequence of length s.

    s <= max_position_embeddings: the unscaled frequencies (HF's init set); beyond it HF rescales the base
    to base * (factor * s / L - (factor - 1)) ** (R / (R - 2)), L = max_position_embeddings, with s a 0-d
    int64 tensor, so in fp32. The scalar pow here runs on a strided view: torch's CPU kernel takes its
    element-by-element loop there (the contiguous SIMD loop rounds some results 1 ulp apart from HF's 0-d
    computation, and at position 1e4 one ulp of inv_freq moves the angle by 1e-3).
    """
    device = target_device(device)
    init = _dynamic_init_inv_freq(
        rotary_dim, base, factor, max_position_embeddings
    )  # on the CPU, as HF's init
    table = init.to(device).repeat(max_positions, 1)
    if max_positions <= max_position_embeddings:
        return table
    seq_len = torch.arange(max_position_embeddings + 1, max_positions + 1, dtype=torch.int64, device=device)
    ratio = (factor * seq_len.float() / max_position_embeddings) - (factor - 1)  # fp32, as HF's tensor path
    strided = torch.empty(2 * ratio.numel(), dtype=ratio.dtype, device=device)[::2]
    strided.copy_(ratio)
    scaled_base = base * strided ** (rotary_dim / (rotary_dim - 2))  # [S] fp32
    exponents = (
        torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).to(dtype=torch.float) / rotary_dim
    )
    table[max_position_embeddings:] = 1.0 / (scaled_base[:, None] ** exponents[None, :])
    return table


def target_device(device: torch.device | str | None) -> torch.device:
    """device, or torch's current default device (the model runner builds models under `torch.device(...)`)."""
    return torch.device(device) if device is not None else torch.get_default_device()


def hf_seq_lens(positions: torch.Tensor, prompt_lens: torch.Tensor) -> torch.Tensor:
    """[T] int64: the sequence length HF's forward saw when it computed each token (device-side, no sync).

    HF runs a prompt in one forward (every prompt token sees the prompt length) and each generated token
    in its own (position + 1): max(position + 1, prompt_len). A recomputed (preempted) sequence keeps the
    lengths its tokens had the first time, so its KV equals HF's.
    """
    return torch.maximum(positions.long() + 1, prompt_lens.long())


def longrope_rows(positions: torch.Tensor, prompt_lens: torch.Tensor, num_positions: int,
                  original_max_position_embeddings: int) -> torch.Tensor:  # fmt: skip
    """Row of each token in `build_longrope_cache`'s [2P, R] table: the long half where HF's sequence was
    longer than original_max_position_embeddings."""
    is_long = hf_seq_lens(positions, prompt_lens) > original_max_position_embeddings
    return positions.long() + num_positions * is_long.long()


def block_rope_key(rope_type: str, threshold: int, start: int, end: int, prompt_len: int) -> int:
    """What the K/V of positions [start, end) depend on beyond their tokens, for a sequence with prompt_len
    (pure python, for the prefix cache): equal keys <=> equal rotations of every position of the block.

    longrope: the number of its positions rotated with the long factors (monotone in the position).
    dynamic: max(prompt_len, threshold, start + 1): position p rotates by max(p + 1, prompt_len), and every
    length up to the threshold gives the same (unscaled) frequencies.
    """
    if rope_type == "longrope":
        if prompt_len > threshold:
            return end - start
        return max(0, end - max(start, threshold))
    if rope_type == "dynamic":
        return max(prompt_len, threshold, start + 1)
    raise ValueError(f"rope_type {rope_type!r} rotates by position alone: no block key")


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, attention_scale: float = 1.0) -> torch.Tensor:
    """[N, R] fp32 rows: cos | sin of positions [N] times inv_freq ([R/2], or one row per position
    [N, R/2]), each times attention_scale: HF's `position.float() * inv_freq`, `.cos() * scaling`."""
    freqs = positions.float()[:, None] * inv_freq  # [N, R/2]
    if attention_scale == 1.0:
        return torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    return torch.cat([freqs.cos() * attention_scale, freqs.sin() * attention_scale], dim=-1)


def build_rope_cache(
    rotary_dim: int,
    max_positions: int,
    base: float = 10000.0,
    rope_scaling: dict[str, Any] | None = None,
    device: torch.device | str | None = None,
    *,
    max_position_embeddings: int | None = None,
) -> torch.Tensor:
    """cos_sin_cache [max_positions, rotary_dim] fp32 (cos half, then sin half), row = position, for the
    position-only rope types; the length-dependent ones have their own tables (ValueError here)."""
    scaling = validate_rope_scaling(rope_scaling, max_position_embeddings)
    rope_type = scaling["rope_type"]
    if rope_type in LENGTH_DEPENDENT_TYPES:
        raise ValueError(f"rope_type {rope_type!r} depends on the sequence length, not only the position: "
                         "use build_longrope_cache / dynamic_inv_freq_table")  # fmt: skip
    inv_freq = compute_inv_freq(rotary_dim, base, scaling)
    positions = torch.arange(max_positions, dtype=torch.float, device="cpu")
    return cos_sin(positions, inv_freq, attention_factor(scaling)).to(target_device(device))


def build_longrope_cache(
    rotary_dim: int,
    max_positions: int,
    base: float,
    rope_scaling: dict[str, Any],
    device: torch.device | str | None = None,
    *,
    max_position_embeddings: int | None = None,
) -> torch.Tensor:
    """[2 * max_positions, rotary_dim] fp32: rows [0, P) rotate with the short factors, [P, 2P) with the
    long ones, both times the longrope attention factor (HF computes it once, for both sets)."""
    scaling = validate_rope_scaling(rope_scaling, max_position_embeddings)
    if scaling["rope_type"] != "longrope":
        raise ValueError(f"build_longrope_cache needs rope_type 'longrope', got {scaling['rope_type']!r}")
    scale = attention_factor(scaling)
    positions = torch.arange(max_positions, dtype=torch.float, device="cpu")
    short = cos_sin(positions, longrope_inv_freq(rotary_dim, base, scaling["short_factor"]), scale)
    long = cos_sin(positions, longrope_inv_freq(rotary_dim, base, scaling["long_factor"]), scale)
    return torch.cat([short, long]).to(target_device(device))
