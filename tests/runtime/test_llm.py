"""The vLLM-style offline API: LLM.generate / LLM.chat prompt forms and output order."""

from __future__ import annotations

import pytest
import torch

from lmforge import LLM, SamplingParams
from lmforge.runtime.models.tiny import save_tiny_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = save_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2", "qwen2")
    return LLM(
        path,
        dtype="float32",
        device="cpu",
        max_model_len=256,
        block_size=16,
        max_num_seqs=4,
        max_num_batched_tokens=64,
        seed=0,
    )


def test_prompt_forms_and_input_order(llm):
    tok = llm.get_tokenizer()
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    text_out = llm.generate("Hello", params)
    ids = tok.encode("Hello")
    assert text_out[0].prompt == "Hello" and text_out[0].prompt_token_ids == ids
    same = [
        llm.generate(ids, params),
        llm.generate([ids], params),
        llm.generate({"prompt_token_ids": ids}, params),
    ]
    for outs in same:
        assert len(outs) == 1 and outs[0].outputs[0].token_ids == text_out[0].outputs[0].token_ids
    # several prompts with different lengths and budgets: outputs come back in input order
    prompts = ["a", "The quick brown fox jumps over the lazy dog", "Hello", "x y z", "one two"]
    per_prompt = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (9, 1, 5, 3, 7)]
    outs = llm.generate(prompts, per_prompt)
    assert [o.prompt for o in outs] == prompts
    assert [len(o.outputs[0].token_ids) for o in outs] == [9, 1, 5, 3, 7]
    assert outs[2].outputs[0].token_ids == text_out[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="2 sampling params for 5 prompts"):
        llm.generate(prompts, per_prompt[:2])


def test_chat_applies_the_template(llm):
    tok = llm.get_tokenizer()
    messages = [{"role": "user", "content": "hi"}]
    out = llm.chat(messages, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))[0]
    assert out.prompt == "<s><|user|>\nhi</s>\n<|assistant|>\n"
    assert out.prompt_token_ids == tok.encode(out.prompt, add_special_tokens=False)
    assert out.prompt_token_ids.count(tok.bos_token_id) == 1
    two = llm.chat(
        [messages, messages + [{"role": "assistant", "content": "yo"}]], SamplingParams(max_tokens=2)
    )
    assert len(two) == 2 and two[1].prompt.endswith("yo</s>\n<|assistant|>\n")


def test_default_cpu_cache_and_logprobs(llm):
    stats = llm.llm_engine.get_stats()
    assert stats.num_total_blocks > 1000  # 0.25 GiB of tiny-model blocks
    assert llm.llm_engine.model_config.max_model_len == 256
    out = llm.generate("Hi", SamplingParams(max_tokens=3, temperature=0.0, logprobs=5))[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids) and all(len(lp) == 5 for lp in out.logprobs)


def test_dummy_load_format_needs_only_a_config_and_detokenize_false_gives_ids(tmp_path):
    """load_format='dummy' (vLLM's name) builds a random model from config.json alone; with
    detokenize=False the outputs carry ids and no text, so any vocabulary size works."""
    import shutil

    src = save_tiny_model(tmp_path / "full", "llama32")
    bare = tmp_path / "bare"
    shutil.copytree(src, bare, ignore=shutil.ignore_patterns("*.safetensors"))
    llm = LLM(bare, load_format="dummy", num_blocks=32, max_model_len=64)
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, detokenize=False)
    out = llm.generate([[3, 4, 5, 6]], params)[0].outputs[0]
    assert len(out.token_ids) == 5 and out.text == ""
    again = LLM(bare, load_format="dummy", num_blocks=32, max_model_len=64).generate([[3, 4, 5, 6]], params)
    assert again[0].outputs[0].token_ids == out.token_ids  # seeded init: the same random model
    with pytest.raises(FileNotFoundError):
        LLM(bare, num_blocks=32, max_model_len=64)  # the default format still wants weights
    with pytest.raises(ValueError, match="load_format"):
        LLM(bare, load_format="pt")
    with pytest.raises(ValueError, match="stop strings need detokenize"):
        SamplingParams(stop=["x"], detokenize=False)
