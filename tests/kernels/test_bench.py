import importlib.util
import pathlib

import pytest
import torch

BENCH = pathlib.Path(__file__).resolve().parents[2] / "bench" / "kernel_bench.py"  # renamed in #15


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit path")
def test_bench_exits_clearly_without_cuda(capsys):
    assert _load_bench().main([]) == 2
    captured = capsys.readouterr()
    assert "needs a CUDA GPU" in captured.err and captured.out == ""


@pytest.mark.gpu
@pytest.mark.slow
def test_bench_runs_on_gpu(capsys):
    assert _load_bench().main([]) == 0
    assert '"decode_attn"' in capsys.readouterr().out
