"""bench/decode_roofline.py and bench/throughput.py: a clear exit without CUDA, and a CPU smoke run
of the same code path on the tiny shape (the GPU numbers come from running them on a GPU)."""

from __future__ import annotations

import importlib
import json

import pytest
import torch


def load(name: str):
    """The bench script as `python -m bench.<name>` imports it (the repo root is on sys.path)."""
    return importlib.import_module(f"bench.{name}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit path")
@pytest.mark.parametrize("name", ["decode_roofline", "throughput"])
def test_exits_2_with_a_hint_without_cuda(name, capsys):
    assert load(name).main([]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "--device cpu --shape tiny" in err


def test_decode_roofline_cpu_smoke(capsys):
    rc = load("decode_roofline").main(
        [
            "--device",
            "cpu",
            "--shape",
            "tiny",
            "--dtype",
            "float32",
            "--prompt-len",
            "8",
            "--new-tokens",
            "8",
            "--repeats",
            "1",
        ]
    )
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    step = report["bytes_per_step"]
    # tiny shape, tied embeddings: every parameter is read once per step (fp32)
    assert (
        step["weight_bytes"] > 0 and step["kv_bytes"] == 2 * 2 * 2 * 16 * 4 * 12
    )  # layers*kv*heads*dim*4B*ctx
    assert step["total"] == step["weight_bytes"] + step["kv_bytes"]
    assert report["lmforge"]["decode_tok_s"] > 0 and report["hf_generate"]["decode_tok_s"] > 0
    assert report["roofline_fraction"] == pytest.approx(
        report["lmforge"]["decode_tok_s"] / report["roofline_tok_s"], abs=1e-3
    )
    assert report["env"]["device"] == "cpu" and report["lmforge"]["cuda_graphs"] is False


def test_throughput_cpu_smoke(capsys):
    rc = load("throughput").main(
        [
            "--device",
            "cpu",
            "--shape",
            "tiny",
            "--dtype",
            "float32",
            "--num-prompts",
            "6",
            "--prompt-len",
            "8",
            "--max-tokens",
            "5",
            "--hf-batch",
            "4",
        ]
    )
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["lmforge"]["generated_tokens"] == report["hf_generate"]["generated_tokens"] == 6 * 5
    assert report["speedup_vs_hf"] > 0


def test_engine_overhead_cpu_smoke(capsys):
    """The host-path bench runs the real engine around a no-op forward: every phase is timed and the
    requests really advance (the fixed logits' argmax tokens come out)."""
    rc = load("engine_overhead").main(
        ["--shape", "tiny", "--batches", "1", "3", "--prompt-len", "20", "--steps", "4"]
    )
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["batch"] for r in report["results"]] == [1, 3]
    for r in report["results"]:
        assert r["us_per_step"] > 0 and set(r["phases_us"]) == {
            "schedule",
            "prepare",
            "forward",
            "sample",
            "output",
        }
        assert all(v >= 0 for v in r["phases_us"].values()), r
        assert r["tokens_per_request"] == 1 + 3 + 4  # prefill, 3 warm-up steps, 4 timed steps


def test_offline_mixed_cpu_smoke(capsys):
    """The mixed-length workload: each request its own max_tokens, HF in static batches of each size."""
    rc = load("offline").main(
        [
            "--mixed",
            "--num-prompts",
            "5",
            "--hidden-size",
            "32",
            "--num-layers",
            "1",
            "--hf-batch-sizes",
            "2",
            "5",
        ]
    )
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(report["hf_by_batch_size"]) == {"2", "5"}
    generated = report["lmforge"]["generated_tokens"]
    assert 5 * 16 <= generated <= 5 * 128 and report["hf"]["generated_tokens"] == generated
    assert report["hf"]["batch_size"] in (2, 5) and report["speedup_output_tok_s"] > 0
    assert 0 <= report["greedy_sequences_identical"] <= 5


def test_lora_mix_cpu_smoke(capsys):
    args = ["--num-rows", "4", "--num-adapters", "2", "--rank", "4", "--max-tokens", "3", "--prompt-len", "5",
            "--hidden-size", "64", "--num-layers", "1", "--repeats", "1"]  # fmt: skip
    assert load("lora_mix").main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for run in ("base", "lora_engine_base_rows", "mixed"):
        assert report[run]["generated_tokens"] == 12 and report[run]["output_tok_s"] > 0
    assert report["mixed_vs_base"] == pytest.approx(
        report["mixed"]["output_tok_s"] / report["base"]["output_tok_s"], abs=1e-3
    )


def test_tensor_parallel_cpu_smoke(capsys):
    """bench/tensor_parallel.py on the tiny shape: both message transports and TP=2 vs TP=1 run."""
    rc = load("tensor_parallel").main(
        ["--device", "cpu", "--dtype", "float32", "--shape", "tiny", "--steps", "50", "--batch", "4"]
        + ["--context", "64", "--num-prompts", "2", "--prompt-len", "8", "--max-tokens", "4"]
    )
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    message = report["message"]
    assert message["ranks"] == 2 and message["message_bytes"] > 0
    assert {"shm_ring_overhead_us", "gloo_broadcast_overhead_us", "all_reduce_alone_us"} <= set(message)
    throughput = report["throughput"]
    assert throughput["tp1"]["output_tokens_per_s"] > 0 and throughput["tp2"]["output_tokens_per_s"] > 0
