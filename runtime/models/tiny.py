"""Tiny random-init HF checkpoints for tests, demos and benchmarks (no hub downloads).

`save_tiny_model(path, arch)` writes config.json, model.safetensors, generation_config.json and
a real tokenizer (byte-level BPE trained in-process on the text below, chat template included)
whose vocabulary matches the model's. Seeded and deterministic; well under a second for the
default shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

ARCHS = ("llama", "llama31", "llama32", "mistral", "qwen2")

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]  # ids 0, 1, 2: bos, eos, pad

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A paged KV cache stores keys and values in blocks.
Continuous batching mixes prefill chunks with decode steps so that the GPU never idles.
Hello world! How are you today? I am fine, thank you. What is the capital of France? Paris.
Kubernetes operators reconcile the desired state with the actual state of the cluster.
Large language models predict the next token given all the previous tokens in the sequence.
def main():\n    print("hello, world")\n    return 0\n
for i in range(10):\n    total += i * i\n
<|system|> You are a helpful assistant. <|user|> Tell me a joke. <|assistant|> Why did the chicken cross the road?
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828 42.
Ünïcödé: café naïve résumé façade. 日本語のテキスト。中文文本。한국어 텍스트. Emoji: 🙂 🚀 🎉 👍🏽 ❤️.
The attention mechanism computes softmax(QK^T / sqrt(d)) V for every head in parallel.
Rotary position embeddings rotate pairs of dimensions by an angle proportional to the position.
"""


def build_tokenizer(vocab_size: int = 384):
    """Byte-level BPE trained on `_CORPUS`; every byte is a token, so any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", chat_template=CHAT_TEMPLATE
    )


def tiny_hf_config(arch: str, vocab_size: int, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                   num_kv_heads: int = 2, intermediate_size: int | None = None,
                   max_position_embeddings: int = 1024, initializer_range: float = 0.02):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    if arch not in ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {ARCHS}")
    common: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, initializer_range=initializer_range,
        bos_token_id=0, eos_token_id=1, pad_token_id=2, rms_norm_eps=1e-5,
    )
    llama3_rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    if arch == "llama":
        return LlamaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if arch in ("llama31", "llama32"):
        return LlamaConfig(**common, rope_parameters=llama3_rope, tie_word_embeddings=arch == "llama32")
    if arch == "mistral":
        return MistralConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                             sliding_window=None)
    return Qwen2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})


def save_tiny_model(path: str | Path, arch: str = "llama", *, hidden_size: int = 64, num_layers: int = 2,
                    num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int | None = None,
                    vocab_size: int = 384, max_position_embeddings: int = 1024, seed: int = 0,
                    initializer_range: float = 0.02, dtype: str = "float32") -> Path:
    """Writes a random-init `arch` checkpoint + tokenizer to `path`; returns the path.

    arch: "llama" (Llama 2/3), "llama31" (llama3 rope scaling), "llama32" (tied embeddings + llama3
    rope), "mistral", "qwen2" (q/k/v bias). `vocab_size` is the BPE target; the model's vocabulary
    is the tokenizer's actual size.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tokenizer = build_tokenizer(vocab_size)
    config = tiny_hf_config(arch, len(tokenizer), hidden_size=hidden_size, num_layers=num_layers,
                            num_heads=num_heads, num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
                            max_position_embeddings=max_position_embeddings, initializer_range=initializer_range)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
