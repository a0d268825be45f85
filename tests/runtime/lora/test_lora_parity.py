"""Multi-LoRA serving vs HF transformers + PEFT on the same widened tiny Llama: greedy tokens and logprobs
(1e-4, float32, CPU) for each adapter alone, for one batch mixing three adapters and the base model, with
slot swapping (more adapters than slots), the adapter-keyed prefix cache, INT8 KV and quantized bases;
negative controls prove the comparison fails when lora_alpha or use_rslora is served wrong."""

from __future__ import annotations

import json
import shutil

import pytest

from lmforge import LLM, LoRARequest, SamplingParams

from .conftest import MAX_TOKENS, hf_greedy, mismatch, random_prompts

LOGPROB_ATOL = 1e-4
PARAMS = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=5, ignore_eos=True)
PROMPT_LENS = [3, 17, 40]


def make_llm(base, modules: dict, **kwargs) -> LLM:
    return LLM(base, device="cpu", dtype="float32", max_model_len=128, num_blocks=64, enable_lora=True,
               lora_modules={k: str(v) for k, v in modules.items()}, **kwargs)  # fmt: skip


def assert_rows_match(base, rows) -> None:
    """rows: (adapter path or None, prompt, completion)."""
    for adapter, prompt, completion in rows:
        assert len(completion.token_ids) == MAX_TOKENS
        first_bad, worst = mismatch(base, adapter, prompt, completion)
        where = f"{getattr(adapter, 'name', 'base')} / prompt of {len(prompt)}"
        assert first_bad is None, f"{where}: departs from HF + PEFT at step {first_bad}"
        assert worst < LOGPROB_ATOL, f"{where}: logprob error {worst:.2e}"


@pytest.mark.parametrize("name", ["attn8", "all16", "mlp8rs", "qv4"])
def test_each_adapter_matches_hf_peft(base, adapters, name):
    prompts = random_prompts(PROMPT_LENS)
    llm = make_llm(base, {name: adapters[name]}, max_lora_rank=16)
    outs = llm.generate(prompts, PARAMS, lora_request=LoRARequest(name))
    assert_rows_match(base, [(adapters[name], p, o.outputs[0]) for p, o in zip(prompts, outs, strict=True)])
    # the adapter matters: HF's base model picks other tokens for at least one prompt
    assert any(
        o.outputs[0].token_ids != hf_greedy(base, None, p)[0] for p, o in zip(prompts, outs, strict=True)
    )


def test_one_batch_mixes_three_adapters_and_the_base(base, adapters):
    names = ["attn8", "all16", "mlp8rs", None]
    prompts = random_prompts([5, 23, 40, 11, 31, 2, 19, 37], seed=7)
    loras = [None if names[i % 4] is None else LoRARequest(names[i % 4]) for i in range(len(prompts))]
    llm = make_llm(base, {n: adapters[n] for n in names if n}, max_loras=3)
    steps = []
    engine = llm.llm_engine
    original = engine.runner.execute

    def spy(sched):  # records which adapters each step's batch mixes
        steps.append({s.seq.lora_id for s in sched.scheduled})
        return original(sched)

    engine.runner.execute = spy
    outs = llm.generate(prompts, PARAMS, lora_request=loras)
    assert max(len(s) for s in steps) == 4  # three adapters and the base in one forward
    rows = [(None if n is None else adapters[n], p, o.outputs[0])
            for n, p, o in zip([names[i % 4] for i in range(len(prompts))], prompts, outs, strict=True)]  # fmt: skip
    assert_rows_match(base, rows)


def test_more_adapters_than_slots_swap_lru_and_reload_from_disk(base, adapters):
    """2 device slots, 2 host copies, 4 adapters: the scheduler runs at most 2 adapters at once, slots are
    reloaded (from disk once the CPU cache dropped them), and every row still matches."""
    names = ["attn8", "all16", "mlp8rs", "qv4"]
    llm = make_llm(base, {n: adapters[n] for n in names}, max_loras=2, max_cpu_loras=2)
    manager = llm.llm_engine.lora
    assert len(manager.cpu_cache) == 2
    prompts = random_prompts([9, 30, 14, 22, 6, 35, 17, 12], seed=3)
    order = [names[i % 4] for i in range(len(prompts))]
    engine, seen = llm.llm_engine, []
    original = engine.runner.execute

    def spy(sched):
        seen.append(engine.scheduler.running_adapters())
        return original(sched)

    engine.runner.execute = spy
    outs = llm.generate(prompts, PARAMS, lora_request=[LoRARequest(n) for n in order])
    assert max(len(s) for s in seen) == 2
    assert manager.num_slot_loads >= 4
    assert_rows_match(
        base, [(adapters[n], p, o.outputs[0]) for n, p, o in zip(order, prompts, outs, strict=True)]
    )


def test_prefix_cache_is_keyed_by_adapter(base, adapters):
    prompt = random_prompts([40], seed=11)[0]
    llm = make_llm(base, {"attn8": adapters["attn8"]}, enable_prefix_caching=True)
    first = llm.generate([prompt], PARAMS)[0]
    with_adapter = llm.generate([prompt], PARAMS, lora_request=LoRARequest("attn8"))[0]
    again = llm.generate([prompt], PARAMS, lora_request=LoRARequest("attn8"))[0]
    assert (
        first.num_cached_tokens == 0 and with_adapter.num_cached_tokens == 0
    )  # the base's blocks: not shared
    assert again.num_cached_tokens == 32  # the adapter's own blocks are
    assert_rows_match(base, [(None, prompt, first.outputs[0]), (adapters["attn8"], prompt, with_adapter.outputs[0]),
                             (adapters["attn8"], prompt, again.outputs[0])])  # fmt: skip


@pytest.mark.parametrize(
    "name,key,value", [("attn8", "lora_alpha", 8), ("mlp8rs", "use_rslora", False), ("all16", "r", 8)]
)
def test_negative_control_a_wrong_config_key_departs(base, adapters, tmp_path, name, key, value):
    """The same weights served with one config key changed no longer match HF + PEFT on the real adapter."""
    wrong = shutil.copytree(adapters[name], tmp_path / "wrong")
    config = json.loads((wrong / "adapter_config.json").read_text())
    config[key] = value
    (wrong / "adapter_config.json").write_text(json.dumps(config))
    if key == "r":  # a smaller r must still describe the tensors: the loader refuses the mismatch
        with pytest.raises(ValueError, match=r"adapter_model.safetensors: .* has lora_A \[16, \d+\]"):
            make_llm(base, {name: wrong})
        return
    prompts = random_prompts(PROMPT_LENS)
    outs = make_llm(base, {name: wrong}).generate(prompts, PARAMS, lora_request=LoRARequest(name))
    results = [mismatch(base, adapters[name], p, o.outputs[0]) for p, o in zip(prompts, outs, strict=True)]
    assert any(first is not None or worst > 1e-2 for first, worst in results)


def test_int8_kv_cache_with_adapters(base, adapters):
    """INT8 KV: our tokens scored by HF + PEFT (teacher forcing) stay within the int8 error of its logprobs,
    and each is HF's argmax or within that error of it."""
    import torch

    from .conftest import hf_model

    prompts = random_prompts([17, 40], seed=5)
    llm = make_llm(base, {"all16": adapters["all16"]}, kv_cache_dtype="int8")
    outs = llm.generate(prompts, PARAMS, lora_request=LoRARequest("all16"))
    model = hf_model(base, adapters["all16"])
    for prompt, out in zip(prompts, outs, strict=True):
        c = out.outputs[0]
        with torch.no_grad():
            rows = model(torch.tensor([prompt + c.token_ids])).logits[0].float().log_softmax(-1)
        for step, token in enumerate(c.token_ids):
            row = rows[len(prompt) - 1 + step]
            assert abs(c.logprobs[step][token] - row[token].item()) < 0.1  # int8 K/V rounding
            assert row.max().item() - row[token].item() < 5e-2
    assert outs[1].outputs[0].token_ids[:4] == hf_greedy(base, adapters["all16"], prompts[1])[0][:4]


@pytest.mark.parametrize("method", ["w8a16", "w4a16-rtn"])
def test_quantized_base_with_adapter_matches_hf_peft(tmp_path, method):
    """LoRA on top of the dequantizing GEMM: HF decompresses the same checkpoint, PEFT adds the adapter."""
    from lmforge.runtime.lora.tiny import LLAMA_ATTENTION, LLAMA_MLP, save_tiny_adapter
    from lmforge.runtime.models.tiny import save_tiny_model
    from lmforge.runtime.quantize import main

    dense = save_tiny_model(tmp_path / "dense", "llama", hidden_size=128, intermediate_size=256, widen=True)
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": f"document {i}: the operator reconciles a job"}) + "\n"
                             for i in range(16)))  # fmt: skip
    quantized = tmp_path / method
    assert main(["--model", str(dense), "--method", method, "--output", str(quantized), "--calibration", str(calib),
                 "--samples", "4", "--seq-len", "32", "--eval-samples", "2", "--eval-seq-len", "32"]) == 0  # fmt: skip
    adapter = save_tiny_adapter(
        dense, tmp_path / "adapter", r=8, target_modules=LLAMA_ATTENTION + LLAMA_MLP, seed=9
    )
    llm = LLM(quantized, device="cpu", dtype="float32", max_model_len=64, num_blocks=16, enable_lora=True,
              lora_modules={"a": str(adapter)})  # fmt: skip
    qkv = llm.llm_engine.runner.model.model.layers[0].self_attn.qkv_proj
    assert type(qkv).__name__ == "LoRALinear" and type(qkv.base).__name__ == "QuantLinear"
    prompts = random_prompts([12, 30], seed=2)
    outs = llm.generate(prompts, PARAMS, lora_request=LoRARequest("a"))
    assert_rows_match(quantized, [(adapter, p, o.outputs[0]) for p, o in zip(prompts, outs, strict=True)])
