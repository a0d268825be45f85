"""Scheduler: token budget, chunked prefill mixed with decode, max_num_seqs, preemption, n>1.

Runner outputs are built by hand (like vLLM's tests/v1/core/test_scheduler.py): every sampling
sequence gets token 7.
"""

from __future__ import annotations

from lmforge.runtime.engine.block_manager import BlockManager
from lmforge.runtime.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from lmforge.runtime.engine.sequence import FinishReason, Request, SequenceStatus
from lmforge.runtime.sampling_params import SamplingParams

BS = 16


def make_scheduler(
    num_blocks=64, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, prefix_caching=True
) -> Scheduler:
    bm = BlockManager(num_blocks, BS, prefix_caching)
    return Scheduler(SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len), bm)


def add(sched: Scheduler, prompt_len: int, start: int = 0, **params):
    req = Request(f"r{start}", None, list(range(start, start + prompt_len)), SamplingParams(**params))
    for seq in req.seqs:
        sched.add_seq(seq)
    return req.seqs if len(req.seqs) > 1 else req.seqs[0]


def run_step(sched: Scheduler) -> SchedulerOutput:
    out = sched.schedule()
    sched.update_from_output(out, {s.seq.seq_id: 7 for s in out.scheduled if s.samples})
    return out


def plan(out: SchedulerOutput) -> list[tuple[int, int]]:
    return [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled]


def test_chunked_prefill_mixes_with_decode_under_one_budget():
    sched = make_scheduler(max_num_batched_tokens=32)
    a = add(sched, 40)
    out = run_step(sched)
    assert plan(out) == [(a.seq_id, 32)] and not out.scheduled[0].samples
    assert a.num_computed_tokens == 32 and a.num_output_tokens == 0
    b = add(sched, 10, start=1000)
    out = run_step(sched)  # the rest of a's prompt, then all of b's
    assert plan(out) == [(a.seq_id, 8), (b.seq_id, 10)] and out.num_batched_tokens == 18
    assert a.output_token_ids == [7] and b.output_token_ids == [7]
    c = add(sched, 50, start=2000)
    out = run_step(sched)  # two decodes + a 30-token chunk of c
    assert plan(out) == [(a.seq_id, 1), (b.seq_id, 1), (c.seq_id, 30)]
    assert out.scheduled[2].block_ids == [4, 5]  # a: 0-2, b: 3
    out = run_step(sched)
    assert plan(out) == [(a.seq_id, 1), (b.seq_id, 1), (c.seq_id, 20)]
    assert [s.num_output_tokens for s in (a, b, c)] == [3, 3, 1]


def test_max_num_seqs_caps_running():
    sched = make_scheduler(max_num_seqs=2)
    seqs = [add(sched, 5, start=100 * i) for i in range(3)]
    out = run_step(sched)
    assert [s.seq for s in out.scheduled] == seqs[:2]
    assert len(sched.waiting) == 1
    sched.finish(seqs[0], FinishReason.LENGTH)
    out = run_step(sched)
    assert [s.seq for s in out.scheduled] == [seqs[1], seqs[2]]


def test_waiting_head_blocks_fcfs_when_out_of_blocks():
    sched = make_scheduler(num_blocks=4)
    a = add(sched, 40)  # 3 blocks
    b = add(sched, 30, start=500)  # needs 2: does not fit
    c = add(sched, 5, start=900)  # would fit, but FCFS keeps it behind b
    out = run_step(sched)
    assert [s.seq for s in out.scheduled] == [a]
    assert list(sched.waiting) == [b, c]


def test_preemption_takes_newest_and_resumes_with_all_tokens():
    sched = make_scheduler(num_blocks=5, max_num_batched_tokens=256)
    a = add(sched, 31)  # 2 blocks, one slot left in the second
    b = add(sched, 32, start=1000)  # exactly 2 blocks
    run_step(sched)
    assert sched.block_manager.num_free_blocks == 1 and a.num_tokens == 32 and b.num_tokens == 33
    out = run_step(sched)  # a: token 32 fits; b needs a 3rd block: the last free one
    assert plan(out) == [(a.seq_id, 1), (b.seq_id, 1)] and not out.preempted
    out = run_step(sched)  # a needs a 3rd block, none left: b (newest) is preempted
    assert plan(out) == [(a.seq_id, 1)] and out.preempted == [b]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert sched.block_manager.get_block_ids(b) == [] and sched.num_preemptions == 1
    assert list(sched.waiting) == [b]
    sched.finish(a, FinishReason.LENGTH)
    out = run_step(sched)  # b comes back: its 34 tokens, minus the 32 still cached, are recomputed
    assert plan(out) == [(b.seq_id, 2)]
    assert b.num_cached_tokens == 0  # only counted for the first (prompt) schedule
    assert b.output_token_ids == [7, 7, 7]


def test_preempting_itself_when_alone():
    sched = make_scheduler(num_blocks=2, max_num_batched_tokens=256, prefix_caching=False)
    a = add(sched, 32)
    run_step(sched)
    out = sched.schedule()  # token 32 needs a 3rd block that does not exist
    assert out.preempted == [a] and out.is_empty


def test_n_siblings_wait_for_the_lead_prompt_then_share_blocks():
    sched = make_scheduler(max_num_batched_tokens=32)
    lead, s1, s2 = add(sched, 40, n=3)
    out = run_step(sched)
    assert plan(out) == [(lead.seq_id, 32)]
    out = run_step(sched)  # lead's last prompt chunk; siblings still wait for it to land
    assert plan(out) == [(lead.seq_id, 8)]
    out = run_step(sched)
    assert plan(out) == [(lead.seq_id, 1), (s1.seq_id, 8), (s2.seq_id, 8)]  # 32 prompt tokens cached
    bm = sched.block_manager
    assert bm.get_block_ids(s1)[:2] == bm.get_block_ids(lead)[:2] == bm.get_block_ids(s2)[:2]
    assert [b.ref_cnt for b in bm.pool.blocks[:2]] == [3, 3]
    assert s1.num_cached_tokens == 32


def test_check_stop_reasons():
    sched = make_scheduler(max_model_len=12)
    a = add(sched, 10, max_tokens=5, stop_token_ids=[9], min_tokens=2)
    a.append_token(1)
    assert sched.check_stop(a, eos_token_ids={1}) is None  # min_tokens not reached
    a.append_token(1)
    assert sched.check_stop(a, eos_token_ids={1}) is FinishReason.STOP and a.stop_reason is None
    b = add(sched, 10, start=50, stop_token_ids=[9], ignore_eos=True)
    b.append_token(1)
    assert sched.check_stop(b, eos_token_ids={1}) is None
    b.append_token(9)
    assert sched.check_stop(b, eos_token_ids={1}) is FinishReason.STOP and b.stop_reason == 9
    c = add(sched, 11, start=80, max_tokens=None)
    c.append_token(3)
    assert sched.check_stop(c, set()) is FinishReason.LENGTH  # hit max_model_len


def test_finish_frees_blocks_anywhere():
    sched = make_scheduler(num_blocks=8)
    a, b = add(sched, 20), add(sched, 20, start=100)
    run_step(sched)
    c = add(sched, 20, start=200)
    for seq in (a, b, c):
        sched.finish(seq, FinishReason.ABORT)
    assert sched.block_manager.num_free_blocks == 8
    assert not sched.has_unfinished() and a.finish_reason is FinishReason.ABORT


def test_pure_modules_do_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys; import lmforge.runtime.engine.scheduler, lmforge.runtime.engine.block_manager; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-P", "-c", code]).returncode == 0
