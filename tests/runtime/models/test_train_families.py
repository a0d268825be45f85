"""The trainer (transformers' AutoModelForCausalLM underneath) fine-tunes a new family, and the engine
serves the result: a few full fine-tune steps on a tiny Gemma2 (soft-caps, alternating windows, tied
embeddings, sandwich norms) lower the loss, and the output matches HF's greedy tokens in lmforge."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmforge import LLM, SamplingParams
from lmforge.runtime.models.tiny import save_tiny_model
from lmforge.runtime.train.config import config_from_dict
from lmforge.runtime.train.loop import train

SENTENCES = ["the cat sat on the mat. ", "one two three four five. ", "abc abc abc abc. "]


def test_train_a_gemma2_then_serve_it(tmp_path: Path) -> None:
    model = save_tiny_model(tmp_path / "gemma2", "gemma2", widen=True)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": SENTENCES[i % 3] * 3}) + "\n" for i in range(24)))
    out = tmp_path / "out"
    config = {
        "model": str(model),
        "dataset": {"source": str(data)},
        "method": "full",
        "hyperparameters": {
            "learningRate": 3e-3,
            "maxSteps": 8,
            "batchSize": 2,
            "seqLen": 48,
            "warmupSteps": 1,
            "seed": 7,
            "logEverySteps": 1,
        },
        "checkpoint": {"everySteps": 8, "keepLast": 1},
        "output": {"dir": str(out)},
    }
    assert train(config_from_dict(config)) == 0
    losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.5, losses

    from transformers import AutoModelForCausalLM

    prompt = list(range(5, 45))  # longer than the 24-token windows
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8)[
            0, len(prompt) :
        ].tolist()
    llm = LLM(out, device="cpu", dtype="float32", max_model_len=128, num_blocks=32)
    got = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    assert got.outputs[0].token_ids == expected


def test_lora_on_the_attention_of_a_mixtral_then_serve_the_merged_model(tmp_path: Path) -> None:
    """LoRA on q/k/v/o of a MoE model (the experts and the router stay frozen): the loss falls, and
    the merged checkpoint serves HF's greedy tokens in lmforge."""
    model = save_tiny_model(tmp_path / "mixtral", "mixtral", widen=True)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": SENTENCES[i % 3] * 3}) + "\n" for i in range(24)))
    out = tmp_path / "out"
    config = {
        "model": str(model),
        "dataset": {"source": str(data)},
        "method": "lora",
        "lora": {"r": 8, "alpha": 16, "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "hyperparameters": {
            "learningRate": 1e-2,
            "maxSteps": 8,
            "batchSize": 2,
            "seqLen": 48,
            "warmupSteps": 1,
            "seed": 7,
            "logEverySteps": 1,
        },  # fmt: skip
        "checkpoint": {"everySteps": 8, "keepLast": 1},
        "output": {"dir": str(out), "mergeAdapter": True},
    }
    assert train(config_from_dict(config)) == 0
    losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.5, losses
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}

    from transformers import AutoModelForCausalLM

    prompt = list(range(5, 45))
    merged = out / "merged"
    hf = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8)[
            0, len(prompt) :
        ].tolist()
    llm = LLM(merged, device="cpu", dtype="float32", max_model_len=128, num_blocks=32)
    got = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    assert got.outputs[0].token_ids == expected
