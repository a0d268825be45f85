"""bench/moe.py: a clear exit without CUDA, and a CPU smoke run of the same code (the fused kernel in the
Triton interpreter against the torch loop, tiny shape) in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(*args: str, interpret: bool) -> subprocess.CompletedProcess:
    # the checkout's root on the path, as `python -m bench.moe` run there has it (-P: not the cwd)
    env = {**os.environ, "TRITON_INTERPRET": "1" if interpret else "0", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-P", "-m", "bench.moe", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit path")
def test_exits_2_with_a_hint_without_cuda():
    done = _run(interpret=False)
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr and "--shape tiny" in done.stderr


def test_cpu_smoke_run_agrees_with_the_loop():
    done = _run("--device", "cpu", "--shape", "tiny", "--dtype", "float32", "--batches", "1,5", "--repeats", "1", "--w4a16",
                interpret=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [row["tokens"] for row in report["rows"]] == [1, 5]
    for row in report["rows"]:
        assert row["max_abs_diff"] < 1e-4 and row["fused_ms"] > 0 and row["torch_loop_ms"] > 0
        assert 1 <= row["experts_used"] <= 4
        assert row["w4a16_fused_ms"] > 0 and row["w4a16_weight_gbps"] > 0
