import pathlib
import subprocess
import sys

import pytest
import torch

BENCH = pathlib.Path(__file__).resolve().parents[2] / "bench" / "kernels.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit path")
def test_bench_exits_clearly_without_cuda():
    proc = subprocess.run([sys.executable, str(BENCH)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr and proc.stdout == ""


@pytest.mark.gpu
@pytest.mark.slow
def test_bench_runs_on_gpu():
    proc = subprocess.run([sys.executable, str(BENCH)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert '"decode_attn"' in proc.stdout
