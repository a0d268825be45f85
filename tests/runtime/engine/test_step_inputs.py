"""InputBuilder: the step inputs from persistent buffers equal the per-token computation they replace,
across steps where tables grow, sequences leave and rows are reused."""

from __future__ import annotations

import pickle
import random

import torch

from lmforge.runtime.engine.scheduler import ScheduledSeq
from lmforge.runtime.engine.sequence import Sequence
from lmforge.runtime.engine.step_inputs import InputBuilder
from lmforge.runtime.sampling_params import SamplingParams

BS = 4


def naive(scheduled: list[ScheduledSeq]) -> dict[str, list]:
    ids, pos, slots, plens, logits = [], [], [], [], []
    for s in scheduled:
        seq, start = s.seq, s.seq.num_computed_tokens
        end = start + s.num_new_tokens
        ids += seq.token_ids[start:end]
        pos += range(start, end)
        slots += [s.block_ids[p // BS] * BS + p % BS for p in range(start, end)]
        plens += [seq.num_prompt_tokens] * s.num_new_tokens
        if end == seq.num_tokens:
            logits.append(len(ids) - 1)
    return {"ids": ids, "pos": pos, "slots": slots, "plens": plens, "logits": logits}


def test_inputs_match_the_per_token_computation_over_many_steps():
    rng = random.Random(0)
    builder = InputBuilder(
        max_num_tokens=256, max_num_seqs=6, max_blocks_per_seq=32, block_size=BS, device=torch.device("cpu")
    )
    free = list(range(200))
    rng.shuffle(free)
    live: dict[int, tuple[Sequence, list[int]]] = {}
    for _ in range(40):
        while len(live) < 5:  # new sequences (prefill)
            n = rng.randint(1, 13)
            seq = Sequence("r", 0, [rng.randrange(1000) for _ in range(n)], n, SamplingParams())
            live[seq.seq_id] = (seq, [])
        scheduled = []
        for seq, table in live.values():
            num_new = seq.num_tokens - seq.num_computed_tokens
            if num_new > 1 and rng.random() < 0.5:
                num_new = rng.randint(1, num_new)  # a prefill chunk
            while len(table) * BS < seq.num_computed_tokens + num_new:
                table.append(free.pop())
            scheduled.append(ScheduledSeq(seq, num_new, table))
        rng.shuffle(scheduled)  # any order of rows
        step_inputs = builder.build(scheduled)
        expected = naive(scheduled)
        assert step_inputs.input_ids.tolist() == expected["ids"]
        assert step_inputs.positions.tolist() == expected["pos"]
        assert step_inputs.slot_mapping.tolist() == expected["slots"]
        assert step_inputs.prompt_lens.tolist() == expected["plens"]
        assert step_inputs.logits_indices.tolist() == expected["logits"]
        for row, s in enumerate(scheduled):
            n = len(s.block_ids)
            assert step_inputs.block_tables[row, :n].tolist() == s.block_ids
            assert step_inputs.seq_lens_host[row] == s.seq.num_computed_tokens + s.num_new_tokens
        for s in scheduled:  # the step ran
            seq = s.seq
            seq.num_computed_tokens += s.num_new_tokens
            if seq.num_computed_tokens == seq.num_tokens:
                seq.append_token(rng.randrange(1000))
        for seq_id in [k for k in live if rng.random() < 0.2]:  # finished or preempted: the row is reused
            seq, table = live.pop(seq_id)
            free += table
            builder.release(seq_id)


def test_lora_ids_per_row_and_a_compact_worker_message():
    """Each row's adapter id (tokens expand it), and the tensor-parallel message: CPU tensors that own
    their memory (a pickled view of the persistent buffers would carry all of them), same values."""
    builder = InputBuilder(
        max_num_tokens=4096,
        max_num_seqs=64,
        max_blocks_per_seq=256,
        block_size=BS,
        device=torch.device("cpu"),
    )
    base = Sequence("a", 0, [5, 6, 7], 3, SamplingParams())
    adapted = Sequence("b", 0, [8, 9], 2, SamplingParams())
    adapted.lora_id = 3
    step = builder.build([ScheduledSeq(base, 3, [0]), ScheduledSeq(adapted, 2, [1])])
    assert step.lora_ids == [0, 3] and step.token_lora_ids() == [0, 0, 0, 3, 3]
    assert builder.build([ScheduledSeq(Sequence("c", 0, [1], 1, SamplingParams()), 1, [2])]).lora_ids == []
    step.logit_calls = [[2, 4]]
    message = pickle.loads(pickle.dumps(step.message()))
    assert len(pickle.dumps(step.message())) < len(pickle.dumps(step)) / 10
    for name in ("input_ids", "positions", "slot_mapping", "prompt_lens", "block_tables", "seq_lens"):
        assert torch.equal(getattr(message, name), getattr(step, name)), name
    assert message.logit_calls == [[2, 4]] and message.lora_ids == [0, 3]
    assert (message.host["tokens"] == step.host["tokens"]).all()
