"""Fixtures for the trainer tests: a tiny random Llama + tokenizer (chat template included) and
small learnable JSONL datasets. Everything is built on the fly; no hub downloads."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
SENTENCES = ["the cat sat on the mat. ", "one two three four five. ", "abc abc abc abc. "]


def build_tokenizer():
    """Byte-level BPE: every byte is a token, so any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   chat_template=CHAT_TEMPLATE)


def save_tiny_llama(path: Path, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def text_rows(n: int) -> list[dict]:
    """Learnable (repeated sentences, counting) yet different rows, so batches are distinguishable."""
    return [{"text": SENTENCES[i % 3] * (1 + i % 2) + " ".join(str(i + k) for k in range(4 + i % 5))}
            for i in range(n)]


def chat_rows(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"say {SENTENCES[i % 3].strip()}"},
                          {"role": "assistant", "content": SENTENCES[i % 3].strip()}]} for i in range(n)]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def text_dataset(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", text_rows(64))


@pytest.fixture(scope="session")
def chat_dataset(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("chat") / "chat.jsonl", chat_rows(48))


def base_config(model: Path, dataset: Path, out: Path, **overrides) -> dict:
    """A small, fast config dict in the file's camelCase layout."""
    config = {
        "model": str(model), "dataset": {"source": str(dataset)}, "method": "full",
        "hyperparameters": {"learningRate": 3e-3, "maxSteps": 12, "batchSize": 2, "seqLen": 64,
                            "warmupSteps": 2, "seed": 7, "logEverySteps": 4},
        "checkpoint": {"everySteps": 4, "keepLast": 2},
        "output": {"dir": str(out)},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def read_losses(out: Path) -> dict[int, float]:
    """step -> loss from train_log.jsonl (the last record of a step wins: resumed runs repeat steps)."""
    losses = {}
    for line in (out / "train_log.jsonl").read_text().splitlines():
        record = json.loads(line)
        losses[record["step"]] = record["loss"]
    return losses


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "KUBERNETES_SERVICE_HOST")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH")]))
    return env


PYTHON = sys.executable


@pytest.fixture(scope="session")
def helpers():
    """This module, so tests can call its helpers (conftest is not importable by name)."""
    return sys.modules[__name__]
