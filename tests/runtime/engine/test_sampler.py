"""Sampler: masks, penalties against hand computation, seeds, logprobs."""

from __future__ import annotations

import math

import torch

from lmforge.runtime.engine.sampler import Sampler, SamplingMetadata, apply_penalties
from lmforge.runtime.sampling_params import SamplingParams


def assert_close(actual, expected, atol=1e-5, rtol=0.0):
    """torch.testing.assert_close costs seconds of imports on first use; this is enough here."""
    assert actual.shape == expected.shape
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), (actual - expected).abs().max()


def meta(params, prompts=None, outputs=None, generators=None, banned=None):
    n = len(params)
    return SamplingMetadata(
        params, prompts or [[]] * n, outputs or [[]] * n, generators or {}, banned or [[]] * n
    )


def kept_tokens(probs: list[float], rows: int = 400, **params) -> set[int]:
    """Tokens the CPU sampler (the kernels' torch reference) draws from one distribution over many rows."""
    sampler = Sampler(torch.Generator().manual_seed(0))
    logits = torch.log(torch.tensor([probs])).repeat(rows, 1)
    out = sampler(logits, meta([SamplingParams(temperature=1.0, **params)] * rows))
    return set(out.token_ids)


def test_cpu_sampler_is_the_kernel_reference():
    """The CPU draw is `reference.sample` on the sampler's own noise: same generator state, same tokens."""
    from lmforge.kernels import reference

    logits = torch.randn(6, 30, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05)] * 6
    out = Sampler(torch.Generator().manual_seed(9))(logits.clone(), meta(params))
    uniform = torch.rand(logits.shape, generator=torch.Generator().manual_seed(9))
    expected = reference.sample(
        logits,
        torch.full((6,), 0.7),
        torch.full((6,), 5, dtype=torch.int32),
        torch.full((6,), 0.9),
        torch.full((6,), 0.05),
        uniform,
    )
    assert out.token_ids == expected.tolist()


def test_top_k_top_p_masks():
    probs = [0.5, 0.2, 0.15, 0.1, 0.05]
    assert kept_tokens(probs, top_k=2) == {0, 1}
    assert kept_tokens(probs, top_p=0.7) == {0, 1}  # 0.5 + 0.2 reaches 0.7
    assert kept_tokens(probs, top_p=0.75) == {0, 1, 2}  # 0.75 needs the third
    assert kept_tokens(probs) == {0, 1, 2, 3, 4}


def test_top_p_keeps_order_of_unsorted_vocab():
    assert kept_tokens([0.1, 0.6, 0.3], top_k=3, top_p=0.8) == {1, 2}


def test_top_k_keeps_ties():
    """The reference keeps every token equal to the k-th largest (the kernel's threshold semantics)."""
    assert kept_tokens([0.4, 0.2, 0.2, 0.2], top_k=2) == {0, 1, 2, 3}


def test_min_p_mask():
    assert kept_tokens([0.5, 0.3, 0.12, 0.08], min_p=0.2) == {0, 1, 2}  # threshold 0.1


def test_penalties_match_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0, -2.0]])
    params = [SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)]
    out = apply_penalties(logits.clone(), meta(params, prompts=[[0]], outputs=[[1, 1, 3]]))
    # token 0: prompt only -> 2/2 = 1; token 1: out x2 -> -1*2 - 0.25*2 - 0.5 = -3;
    # token 2 untouched; token 3: out x1 -> 1/2 - 0.25 - 0.5 = -0.25; token 4 untouched
    assert_close(out, torch.tensor([[1.0, -3.0, 0.5, -0.25, -2.0]]))


def test_greedy_rows_and_penalised_argmax():
    sampler = Sampler(torch.Generator().manual_seed(0))
    logits = torch.tensor([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0]])
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, repetition_penalty=4.0)]
    out = sampler(logits, meta(params, prompts=[[], [1]], outputs=[[], []]))
    assert out.token_ids == [1, 2] and out.logprobs == [None, None]


def test_min_tokens_bans_stop_ids():
    sampler = Sampler(torch.Generator().manual_seed(0))
    out = sampler(torch.tensor([[5.0, 1.0, 0.0]]), meta([SamplingParams(temperature=0)], banned=[[0]]))
    assert out.token_ids == [1]


def test_seeded_rows_reproduce_regardless_of_batch():
    vocab = 50
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(1))
    p = SamplingParams(temperature=1.0, seed=1234)

    def draw(batch_extra: int, steps=10):
        gen = torch.Generator().manual_seed(1234)
        sampler = Sampler(torch.Generator().manual_seed(batch_extra))
        toks = []
        for _ in range(steps):
            rows = torch.cat([torch.randn(batch_extra, vocab), logits])
            params = [SamplingParams(temperature=1.0)] * batch_extra + [p]
            out = sampler(rows, meta(params, generators={batch_extra: gen}))
            toks.append(out.token_ids[-1])
        return toks

    assert draw(0) == draw(3) == draw(7)
    assert len(set(draw(0))) > 1  # it does sample


def test_sampling_follows_distribution_and_top_k():
    sampler = Sampler(torch.Generator().manual_seed(0))
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).repeat(4000, 1)
    out = sampler(logits, meta([SamplingParams(temperature=1.0)] * 4000))
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=3).float() / 4000
    assert_close(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.03, rtol=0)
    out = sampler(logits[:500], meta([SamplingParams(temperature=1.0, top_k=2)] * 500))
    assert set(out.token_ids) == {0, 1}


def test_logprobs_are_raw_model_distribution():
    sampler = Sampler(torch.Generator().manual_seed(0))
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    params = [SamplingParams(temperature=0.5, logprobs=2, repetition_penalty=1.5, seed=3)]
    out = sampler(logits, meta(params, prompts=[[2]], outputs=[[]], generators={0: torch.Generator()}))
    raw = torch.log_softmax(logits, -1)[0].tolist()
    tok = out.token_ids[0]
    assert list(out.logprobs[0])[0] == tok  # the sampled token first, then the top-2
    assert set(out.logprobs[0]) == {tok, 2, 1}
    for t, lp in out.logprobs[0].items():
        assert math.isclose(lp, raw[t], abs_tol=1e-6)
    assert math.isclose(out.sampled_logprobs[0], raw[tok], abs_tol=1e-6)


def kernel_sampler(seed: int) -> Sampler:
    """A Sampler on the Triton sampling kernel (the interpreter on CPU)."""
    from lmforge.kernels._interp import interpreting, patch_bf16
    from lmforge.kernels.backend import get_ops

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if interpreting():
        patch_bf16()
    return Sampler(torch.Generator(device=device).manual_seed(seed), get_ops(device, "triton"))


def test_kernel_path_is_used_and_follows_distribution_top_k_and_min_p():
    sampler = kernel_sampler(0)
    assert sampler.ops is not None and sampler.ops.name == "triton"
    rows = 300  # the interpreter runs one program per row: keep it small
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).repeat(rows, 1)
    out = sampler(logits, meta([SamplingParams(temperature=1.0)] * rows))
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=3).float() / rows
    assert_close(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.09, rtol=0)  # 3 sigma at n=300
    out = sampler(logits[:50], meta([SamplingParams(temperature=1.0, top_k=2)] * 50))
    assert set(out.token_ids) == {0, 1}
    out = sampler(logits[:50], meta([SamplingParams(temperature=1.0, min_p=0.4)] * 50))
    assert set(out.token_ids) == {0, 1}  # p=0.1 < 0.4 * 0.6
    out = sampler(logits[:50], meta([SamplingParams(temperature=1.0, top_p=0.5)] * 50))
    assert set(out.token_ids) == {0}


def test_kernel_path_mixes_greedy_seeded_and_penalised_rows():
    vocab = 40
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(5))
    seeded = SamplingParams(temperature=0.8, seed=77)

    def draw(extra: int) -> list[int]:
        sampler = kernel_sampler(extra)
        gen = torch.Generator().manual_seed(77)
        toks = []
        for _ in range(6):
            rows = torch.cat([torch.randn(extra, vocab), logits, logits])
            params = [SamplingParams(temperature=1.0, top_k=5)] * extra + [
                seeded,
                SamplingParams(temperature=0.0),
            ]
            out = sampler(rows, meta(params, generators={extra: gen}))
            assert out.token_ids[-1] == int(logits.argmax())  # greedy row
            toks.append(out.token_ids[-2])
        return toks

    assert draw(0) == draw(2)
    assert len(set(draw(0))) > 1
    # penalties are applied before the kernel (temperature 0.01: sampled, but as good as certain)
    sampler = kernel_sampler(0)
    row = torch.tensor([[5.0, 4.0, -1.0]])
    out = sampler(
        row, meta([SamplingParams(temperature=0.01, repetition_penalty=2.0)], prompts=[[0]], outputs=[[]])
    )
    assert out.token_ids == [1]


def test_guided_bitmask_reaches_both_draw_paths():
    """The bitmask is applied before the draw: torch and Triton sampling see the same masked logits,
    so a constrained row only ever gets an allowed token, whatever its temperature."""
    vocab, rows = 70, 24
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(3))
    bitmask = torch.zeros(1, 3, dtype=torch.int32)
    bitmask[0, 0], bitmask[0, 2] = 1 << 9, 1 << 1  # tokens 9 and 65
    params = [SamplingParams(temperature=1.5)] * rows
    for sampler in (Sampler(torch.Generator().manual_seed(0)), kernel_sampler(0)):
        for row in (0, 5, rows - 1):
            m = meta(params)
            m.guided_rows, m.token_bitmask = [row], bitmask
            assert sampler(logits.clone(), m).token_ids[row] in (9, 65)
        greedy = meta([SamplingParams(temperature=0.0)] * rows)
        greedy.guided_rows, greedy.token_bitmask = [2], bitmask
        out = sampler(logits.clone(), greedy)
        assert out.token_ids[2] == (9 if logits[2, 9] > logits[2, 65] else 65)
        assert out.token_ids[:2] + out.token_ids[3:] == (
            logits.argmax(-1).tolist()[:2] + logits.argmax(-1).tolist()[3:]
        )
