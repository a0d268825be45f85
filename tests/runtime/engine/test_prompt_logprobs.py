"""Prompt logprobs: the pure pieces with exact values (rows to score, scoring, the prefix-cache cap),
then the engine on a tiny checkpoint (output shape, validation, aborts, n>1, the decode-graph path).
Agreement with HF transformers is in tests/runtime/test_llm_parity.py."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.runtime.engine.block_manager import BlockManager
from lmforge.runtime.engine.config import EngineArgs
from lmforge.runtime.engine.llm_engine import LLMEngine
from lmforge.runtime.engine.prompt_logprobs import PromptLogprobsBatch, positions_to_score, score_rows
from lmforge.runtime.engine.sequence import Request, Sequence
from lmforge.runtime.models.tiny import save_tiny_model
from lmforge.runtime.outputs import Logprob
from lmforge.runtime.sampling_params import SamplingParams


def make_seq(num_prompt: int, prompt_logprobs: int | None = 2, done: int = 0) -> Sequence:
    seq = Sequence(
        "r", 0, list(range(10, 10 + num_prompt)), num_prompt, SamplingParams(prompt_logprobs=prompt_logprobs)
    )
    seq.prompt_logprobs = [{} for _ in range(done)]
    return seq


# --- pure pieces ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_prompt", "k", "done", "start", "end", "want"),
    [
        (10, 2, 0, 0, 10, range(0, 9)),  # the whole prompt in one step: every position but the sampling one
        (10, 2, 0, 0, 4, range(0, 4)),  # first chunk
        (10, 2, 4, 4, 8, range(4, 8)),  # second chunk
        (10, 2, 8, 8, 10, range(8, 9)),  # last chunk: position 9 samples
        (10, 2, 6, 0, 8, range(6, 8)),  # recomputed after a preemption: 0..5 were scored already
        (10, 2, 6, 0, 4, range(6, 4)),  # ... nothing new yet
        (10, 2, 9, 9, 10, range(0)),  # all owed entries are in
        (10, None, 0, 0, 10, range(0)),  # not asked
        (1, 2, 0, 0, 1, range(0)),  # a 1-token prompt has nothing to score
    ],
    ids=[
        "whole",
        "chunk-1",
        "chunk-2",
        "last-chunk",
        "recompute",
        "recompute-early",
        "done",
        "not-asked",
        "one-token",
    ],
)
def test_positions_to_score(num_prompt, k, done, start, end, want):
    assert list(positions_to_score(make_seq(num_prompt, k, done), start, end)) == list(want)


def test_positions_to_score_refuses_a_gap():
    with pytest.raises(AssertionError, match="skipped"):
        positions_to_score(make_seq(10, done=2), 4, 8)


def test_siblings_owe_nothing():
    req = Request("r", None, list(range(3, 13)), SamplingParams(n=3, prompt_logprobs=1))
    assert [s.num_prompt_logprobs_pending for s in req.seqs] == [9, 0, 0]


def test_score_rows_exact_values_ranks_and_order():
    logits = torch.tensor([[0.0, 1.0, 2.0, 2.0], [3.0, 0.0, 0.0, 0.0]])
    lse0, lse1 = math.log(1 + math.e + 2 * math.e**2), math.log(math.e**3 + 3)
    got = score_rows(logits, targets=[1, 0], num_top=[2, 0])
    assert list(got[0]) == [1, 2, 3]  # the target first, then the top 2
    assert got[0][1] == Logprob(pytest.approx(1.0 - lse0), 3)  # two tokens are more likely
    assert got[0][2] == Logprob(pytest.approx(2.0 - lse0), 1) and got[0][3].logprob == pytest.approx(
        2.0 - lse0
    )
    assert got[1] == {0: Logprob(pytest.approx(3.0 - lse1), 1)}  # k=0: the target alone
    tied = score_rows(logits[:1], targets=[2], num_top=[0])[0]  # ties count: both 2.0 logits rank 2
    assert tied == {2: Logprob(pytest.approx(2.0 - lse0), 2)}


def test_score_rows_target_inside_top_k_keeps_its_rank_and_k_is_capped_by_the_vocab():
    got = score_rows(torch.tensor([[5.0, 1.0, 0.0]]), targets=[0], num_top=[20])[0]
    assert list(got) == [0, 1, 2] and [lp.rank for lp in got.values()] == [1, 2, 3]


def test_batch_scores_in_slices_and_splits_rows_per_sequence():
    a, b, c = make_seq(6), make_seq(4, prompt_logprobs=None), make_seq(5, prompt_logprobs=0, done=1)
    batch = PromptLogprobsBatch()
    batch.add(a, 0, 6, first_row=0)  # rows 0..4 score tokens 1..5
    batch.add(b, 0, 4, first_row=6)  # not asked: no rows
    batch.add(c, 1, 3, first_row=10)  # rows 10, 11 score tokens 2, 3
    assert batch.rows == [0, 1, 2, 3, 4, 10, 11]
    assert batch.targets == a.token_ids[1:6] + c.token_ids[2:4]
    assert batch.num_top == [2] * 5 + [0] * 2
    vocab = 32
    hidden = torch.randn(12, vocab, generator=torch.Generator().manual_seed(0))
    calls = []

    def row_logits(rows):
        calls.append(rows)
        return hidden[rows]

    got = batch.compute(row_logits, max_rows=3)
    assert calls == [[0, 1, 2], [3, 4, 10], [11]]
    assert sorted(got) == [a.seq_id, c.seq_id] and [len(got[a.seq_id]), len(got[c.seq_id])] == [5, 2]
    ref = hidden.log_softmax(-1)
    for entries, rows, targets in (
        (got[a.seq_id], range(5), a.token_ids[1:6]),
        (got[c.seq_id], [10, 11], c.token_ids[2:4]),
    ):
        for entry, row, target in zip(entries, rows, targets, strict=True):
            assert next(iter(entry)) == target
            assert entry[target].logprob == pytest.approx(ref[row, target].item(), abs=1e-6)


def test_prefix_cache_is_not_read_for_owed_prompt_logprobs():
    bm = BlockManager(num_blocks=16, block_size=4)
    tokens = list(range(100, 118))  # 4 full blocks + 2
    first = Sequence("a", 0, list(tokens), 18, SamplingParams())
    blocks, cached = bm.get_computed_blocks(first)
    assert bm.allocate_slots(first, 18, blocks) and cached == 0
    plain = Sequence("b", 0, list(tokens), 18, SamplingParams())
    assert bm.get_computed_blocks(plain)[1] == 16
    owes_all = Sequence("c", 0, list(tokens), 18, SamplingParams(prompt_logprobs=1))
    assert bm.get_computed_blocks(owes_all) == ([], 0)
    owes_some = Sequence("d", 0, list(tokens), 18, SamplingParams(prompt_logprobs=1))
    owes_some.prompt_logprobs = [{}] * 10  # preempted after scoring 10 tokens: positions 10.. still owed
    assert bm.get_computed_blocks(owes_some)[1] == 8
    owes_some.prompt_logprobs = [{}] * 17  # all owed entries are in
    assert bm.get_computed_blocks(owes_some)[1] == 16


# --- the engine ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def make_engine(model_dir, **kw) -> LLMEngine:
    args = dict(
        model=model_dir, device="cpu", dtype="float32", max_model_len=128, num_blocks=32, block_size=8
    )
    return LLMEngine(EngineArgs(**{**args, **kw}))


def run_all(engine: LLMEngine) -> dict:
    last = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            last[out.request_id] = out
    return last


def greedy(**kw) -> SamplingParams:
    return SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, **kw)


def test_output_shape_tokens_and_validation(model_dir):
    engine = make_engine(model_dir)
    prompt = [5, 17, 99, 230, 7, 64]
    engine.add_request("k2", prompt, greedy(prompt_logprobs=2))
    engine.add_request("k0", prompt, greedy(prompt_logprobs=0))
    engine.add_request("one", [42], greedy(prompt_logprobs=3))
    engine.add_request("none", prompt, greedy())
    engine.add_request("ids", prompt, greedy(prompt_logprobs=1, detokenize=False))
    with pytest.raises(ValueError, match="prompt_logprobs=21 exceeds max_logprobs=20"):
        engine.add_request("big", prompt, greedy(prompt_logprobs=21))
    outs = run_all(engine)
    k2 = outs["k2"].prompt_logprobs
    assert len(k2) == len(prompt) and k2[0] is None
    for token, entry in zip(prompt[1:], k2[1:], strict=True):
        assert next(iter(entry)) == token and 2 <= len(entry) <= 3
        ranks = [lp.rank for lp in entry.values()]
        assert ranks[0] >= 1 and sorted(ranks[1:]) == [1, 2]
        assert all(lp.logprob <= 0 for lp in entry.values())
        assert entry[token].decoded_token == engine.tokenizer.decode([token])
    k0 = outs["k0"].prompt_logprobs
    assert [list(e) for e in k0[1:]] == [[t] for t in prompt[1:]]
    assert [e[t].logprob for e, t in zip(k0[1:], prompt[1:], strict=True)] == [
        e[t].logprob for e, t in zip(k2[1:], prompt[1:], strict=True)
    ]
    assert outs["one"].prompt_logprobs == [None]
    assert outs["none"].prompt_logprobs is None
    assert all(lp.decoded_token is None for e in outs["ids"].prompt_logprobs[1:] for lp in e.values())
    assert outs["k2"].outputs[0].token_ids == outs["none"].outputs[0].token_ids  # generation is unchanged
    assert engine.get_stats().num_free_blocks == 32


def test_n_samples_score_the_prompt_once_and_share_its_blocks(model_dir):
    engine = make_engine(model_dir)
    prompt = list(range(3, 40))
    engine.add_request("n", prompt, greedy(n=3, prompt_logprobs=1))
    out = run_all(engine)["n"]
    assert len(out.prompt_logprobs) == len(prompt) and len(out.outputs) == 3
    seqs_hits = engine.get_stats().prefix_cache_hits
    assert seqs_hits >= 2 * 32  # the siblings reused sample 0's 4 full blocks
    assert engine.get_stats().num_free_blocks == 32


def test_abort_mid_prefill_frees_blocks_and_reports_what_was_scored(model_dir):
    engine = make_engine(model_dir, max_num_batched_tokens=8)
    engine.add_request("long", list(range(3, 60)), greedy(prompt_logprobs=1))
    engine.step()
    engine.step()
    engine.abort_request("long")
    out = engine.step()[0]
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert len(out.prompt_logprobs) == 1 + 16  # two 8-token chunks scored
    assert engine.get_stats().num_free_blocks == 32


def test_one_token_prefill_chunks_through_the_decode_graph_path(model_dir):
    """A step where every row has one token (decodes plus 1-token prefill chunks) runs the static
    decode-graph forward; the chunks' prompt logprobs come from its logits rows."""
    pytest.importorskip("triton")
    from lmforge.kernels._interp import interpreting, patch_bf16

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        if not interpreting():
            pytest.skip("the Triton interpreter was not switched on before triton was imported")
        patch_bf16()
    prompts = [list(range(5, 9)), list(range(40, 47))]
    params = [
        SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logprobs=2),
    ]
    results = {}
    for name in ("torch", "graphs"):
        engine = make_engine(
            model_dir,
            device=device,
            max_model_len=64,
            num_blocks=16,
            max_num_seqs=4,
            max_num_batched_tokens=2,
            attention_backend="torch" if name == "torch" else "triton",
            enforce_eager=name == "torch",
        )
        graph_rows = []
        if name == "graphs":
            runner = engine.runner
            if device == "cpu":
                runner.prepare_decode_graphs(4, capture=False)
            run = runner.decode_graphs.run

            def counted(input_ids, *args, run=run, seen=graph_rows):
                seen.append(len(input_ids))
                return run(input_ids, *args)

            runner.decode_graphs.run = counted
        engine.add_request("a", prompts[0], params[0])
        for _ in range(4):  # "a" is decoding before "b" arrives: then each step is 1 decode + 1 chunk token
            engine.step()
        engine.add_request("b", prompts[1], params[1])
        results[name] = run_all(engine)["b"]
        if name == "graphs":
            assert graph_rows.count(2) >= 7, graph_rows  # "b"'s prompt went through the graph path
    ref, got = results["torch"], results["graphs"]
    assert got.outputs[0].token_ids == ref.outputs[0].token_ids
    assert len(got.prompt_logprobs) == len(prompts[1])
    for a, b in zip(ref.prompt_logprobs[1:], got.prompt_logprobs[1:], strict=True):
        assert list(a) == list(b) and all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)
