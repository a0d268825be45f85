"""Next-token sampling for a batch of rows with per-row SamplingParams.

Order (vLLM v1): guided-decoding bitmask (rows with a grammar; both draw paths below see the same
masked logits) -> raw log-softmax for logprobs -> min_tokens EOS ban -> repetition / presence /
frequency penalties -> greedy rows take the argmax -> temperature -> min-p -> top-k / top-p ->
one draw per row. Rows with a `seed` draw their noise from their own torch.Generator, so their
tokens do not depend on what else is in the batch.

One draw, `ops.sample` of the kernel backend the model runs on, fed the same uniform noise either way:
  torch  - `lmforge.kernels.reference.sample` (top-k / top-p / min-p masks from a sort, ties kept,
           then Gumbel-max): the spec the Triton kernel is tested against, so CPU runs CUDA's semantics;
  triton - the fused kernel: thresholds found without sorting, the same Gumbel-max draw, one program
           per row.
A batch of greedy rows only never reaches it (argmax); the only host sync of a step is copying the
token ids out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lmforge.kernels.reference import apply_token_bitmask
from lmforge.runtime.sampling_params import SamplingParams

_GREEDY_EPS = 1e-5  # temperatures below this are greedy


@dataclass(slots=True)
class SamplingMetadata:
    params: list[SamplingParams]  # one per row
    prompt_token_ids: list[list[int]]
    output_token_ids: list[list[int]]
    generators: dict[int, torch.Generator]  # row -> generator of a seeded request
    stop_ids_before_min_tokens: list[list[int]]  # per row: EOS + stop ids banned until min_tokens
    guided_rows: list[int] = field(default_factory=list)  # rows with a grammar, in bitmask order
    token_bitmask: torch.Tensor | None = None  # [len(guided_rows), ceil(V/32)] int32, see apply_token_bitmask
    # derived from params once (the runner caches the metadata per batch composition)
    greedy: list[bool] = field(default_factory=list)  # per row: temperature ~0 or top_k 1
    all_greedy: bool = True
    any_logprobs: bool = False
    any_penalties: bool = False

    def __post_init__(self) -> None:
        self.greedy = [p.temperature < _GREEDY_EPS or p.top_k == 1 for p in self.params]
        self.all_greedy = all(self.greedy)
        self.any_logprobs = any(p.logprobs is not None for p in self.params)
        self.any_penalties = any(_has_penalties(p) for p in self.params)


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    token_tensor: torch.Tensor  # [N] int64 on the logits' device (async scheduling feeds it to the next step)
    logprobs: list[dict[int, float] | None]  # per row when requested: {sampled id: lp, top ids: lp, ...}
    sampled_logprobs: list[float | None]


class Sampler:
    def __init__(self, generator: torch.Generator, ops: Any = None):
        self.generator = generator  # for unseeded rows
        if ops is None:  # the torch reference ops of the generator's device
            from lmforge.kernels.backend import get_ops

            ops = get_ops(generator.device, "torch")
        self.ops = ops  # lmforge.kernels.backend.Ops

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        logits = logits.float()  # [N, V]
        num_rows = logits.shape[0]
        if meta.guided_rows:
            rows = torch.tensor(meta.guided_rows, device=logits.device)
            assert meta.token_bitmask is not None  # filled whenever guided_rows is
            logits = apply_token_bitmask(
                logits, meta.token_bitmask.to(logits.device, non_blocking=True), rows
            )
        raw_logprobs = torch.log_softmax(logits, dim=-1) if meta.any_logprobs else None

        if any(meta.stop_ids_before_min_tokens):
            for row, banned in enumerate(meta.stop_ids_before_min_tokens):
                if banned:
                    logits[row, banned] = float("-inf")
        if meta.any_penalties:
            logits = apply_penalties(logits, meta)

        if meta.all_greedy:
            tokens = argmax_rows(logits)
        else:  # greedy rows take the argmax inside the draw (temperature 0)
            tokens = self._sample(logits, meta, meta.greedy)

        token_list = tokens.tolist()
        if raw_logprobs is None:
            return SamplerOutput(token_list, tokens, [None] * num_rows, [None] * num_rows)
        want = [p.logprobs for p in meta.params]
        return SamplerOutput(token_list, tokens, *_logprobs(raw_logprobs, tokens, token_list, want))

    def _sample(self, logits: torch.Tensor, meta: SamplingMetadata, greedy: list[bool]) -> torch.Tensor:
        """`ops.sample` over every row; greedy rows get temperature 0 (argmax inside the draw). The noise
        is uniform [N, V] from the engine's generator, a seeded row's from its own generator."""
        device = logits.device
        params = meta.params
        temperature = torch.tensor(
            [0.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)], device=device
        )
        top_k = torch.tensor([max(p.top_k, 0) for p in params], dtype=torch.int32, device=device)
        top_p = torch.tensor([p.top_p for p in params], device=device)
        min_p = (
            torch.tensor([p.min_p for p in params], device=device)
            if any(p.min_p > 0 for p in params)
            else None
        )
        uniform = torch.rand(logits.shape, device=device, generator=self.generator)
        for row, gen in meta.generators.items():
            uniform[row] = torch.rand(logits.shape[1], device=device, generator=gen)
        return self.ops.sample(logits.contiguous(), temperature, top_k, top_p, min_p, uniform)


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """[N, V] fp32 -> [N] int64, the first index of each row's maximum (torch.argmax semantics). On CPU
    numpy's vectorised argmax: torch's CPU argmax over a 32k vocabulary costs ~100 us per row."""
    if logits.device.type == "cpu" and logits.is_contiguous():
        return torch.from_numpy(np.argmax(logits.numpy(), axis=-1).astype(np.int64, copy=False))
    return logits.argmax(dim=-1)


def _has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _token_counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[N, V] occurrences of each token id per row."""
    width = max((len(t) for t in token_lists), default=0)
    padded = torch.full((len(token_lists), width + 1), vocab, dtype=torch.int64)
    for row, ids in enumerate(token_lists):
        padded[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
    counts = torch.zeros(len(token_lists), vocab + 1, device=device)
    counts.scatter_add_(1, padded.to(device), torch.ones_like(padded, dtype=counts.dtype, device=device))
    return counts[:, :vocab]


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Repetition (HF/vLLM: divide positive, multiply negative logits of tokens seen in prompt or
    output), then frequency (x count) and presence (x seen) over generated tokens only."""
    vocab, device = logits.shape[-1], logits.device
    out_counts = _token_counts(meta.output_token_ids, vocab, device)
    seen = (_token_counts(meta.prompt_token_ids, vocab, device) > 0) | (out_counts > 0)
    rep = torch.tensor([p.repetition_penalty for p in meta.params], device=device)[:, None]
    freq = torch.tensor([p.frequency_penalty for p in meta.params], device=device)[:, None]
    pres = torch.tensor([p.presence_penalty for p in meta.params], device=device)[:, None]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    return logits - freq * out_counts - pres * (out_counts > 0).float()


def _logprobs(
    raw_logprobs: torch.Tensor, tokens: torch.Tensor, token_list: list[int], want: list[int | None]
) -> tuple[list[dict[int, float] | None], list[float | None]]:
    """Per row: {sampled token and the top want[row] tokens: logprob} and the sampled token's logprob
    (None for rows that asked for none), from the logprobs before penalties and sampling."""
    k = max(n or 0 for n in want)
    chosen = raw_logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
    top_vals: list[list[float]] = []
    top_ids: list[list[int]] = []
    if k:
        top_vals_t, top_ids_t = raw_logprobs.topk(k, dim=-1)
        top_vals, top_ids = top_vals_t.tolist(), top_ids_t.tolist()
    logprobs: list[dict[int, float] | None] = [None] * len(want)
    sampled_lps: list[float | None] = [None] * len(want)
    for row, n in enumerate(want):
        if n is None:
            continue
        entry = {token_list[row]: chosen[row]}
        for j in range(n):
            entry.setdefault(top_ids[row][j], top_vals[row][j])
        logprobs[row], sampled_lps[row] = entry, chosen[row]
    return logprobs, sampled_lps
