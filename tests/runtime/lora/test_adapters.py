"""Bad adapters are refused with the file and field named; engine-level adapter lifecycle (load, unload,
unknown names); the scheduler never runs more distinct adapters than there are device slots."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from lmforge import LLM, LoRARequest, SamplingParams
from lmforge.runtime.lora.adapter import AdapterError
from lmforge.runtime.lora.tiny import save_tiny_adapter
from lmforge.runtime.models.tiny import save_tiny_model

from .conftest import random_prompts

PARAMS = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def make_llm(base, **kwargs) -> LLM:
    return LLM(
        base, device="cpu", dtype="float32", max_model_len=128, num_blocks=64, enable_lora=True, **kwargs
    )


@pytest.fixture(scope="module")
def llm(base) -> LLM:
    return make_llm(base, max_lora_rank=8, max_loras=2)


def _edit_config(src, dst, **changes):
    path = shutil.copytree(src, dst)
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def test_rank_above_max_lora_rank_names_the_file(llm, adapters):
    with pytest.raises(AdapterError, match=r"all16/adapter_config.json: r=16 exceeds --max-lora-rank 8"):
        llm.llm_engine.add_lora(LoRARequest("big", str(adapters["all16"])))


def test_adapter_of_another_base_shape_names_the_tensor(llm, tmp_path):
    other = save_tiny_model(tmp_path / "other", "llama", hidden_size=32)
    adapter = save_tiny_adapter(other, tmp_path / "wrong-shape", r=4)
    with pytest.raises(AdapterError, match=r"wrong-shape/adapter_model.safetensors: model.layers.0.self_attn"
                       r".\w_proj has lora_A \[4, 32\]"):  # fmt: skip
        llm.llm_engine.add_lora(LoRARequest("other", str(adapter)))


@pytest.mark.parametrize(
    "remove,message",
    [("adapter_model.safetensors", r"adapter_model.safetensors: no such file"),
     ("adapter_config.json", r"adapter_config.json: no such file")],
)  # fmt: skip
def test_missing_files_are_named(llm, adapters, tmp_path, remove, message):
    path = shutil.copytree(adapters["qv4"], tmp_path / "partial")
    (path / remove).unlink()
    with pytest.raises(AdapterError, match=message):
        llm.llm_engine.add_lora(LoRARequest("partial", str(path)))
    with pytest.raises(AdapterError, match="no such adapter directory"):
        llm.llm_engine.add_lora(LoRARequest("nowhere", str(tmp_path / "nowhere")))


@pytest.mark.parametrize(
    "changes,message",
    [({"use_dora": True}, "use_dora=True is not supported"),
     ({"bias": "all"}, "bias='all' is not supported"),
     ({"modules_to_save": ["lm_head"]}, "modules_to_save=\\['lm_head'\\] is not supported"),
     ({"rank_pattern": {"q_proj": 2}}, "rank_pattern=.* is not supported"),
     ({"peft_type": "IA3"}, "peft_type 'IA3' is not served"),
     ({"some_future_switch": 3}, "some_future_switch=3 is not supported")],
)  # fmt: skip
def test_config_keys_that_change_the_math_are_refused_by_name(llm, adapters, tmp_path, changes, message):
    path = _edit_config(adapters["qv4"], tmp_path / "edited", **changes)
    with pytest.raises(AdapterError, match=f"edited/adapter_config.json: {message}"):
        llm.llm_engine.add_lora(LoRARequest("edited", str(path)))


def test_foreign_tensors_are_refused(llm, adapters, tmp_path):
    path = shutil.copytree(adapters["qv4"], tmp_path / "dora-weights")
    tensors = load_file(path / "adapter_model.safetensors")
    name = next(iter(tensors)).replace("lora_A.weight", "lora_magnitude_vector")
    tensors[name] = tensors[next(iter(tensors))][0].clone()
    save_file(tensors, path / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="lora_magnitude_vector.* is not a LoRA A/B weight"):
        llm.llm_engine.add_lora(LoRARequest("dora", str(path)))


def test_load_unload_and_unknown_names(base, adapters):
    llm = make_llm(base)
    engine = llm.llm_engine
    with pytest.raises(ValueError, match="'qv4' is not loaded"):
        engine.add_request("r0", [5, 6, 7], PARAMS, lora_request=LoRARequest("qv4"))
    engine.add_lora(LoRARequest("qv4", str(adapters["qv4"])))
    with pytest.raises(ValueError, match="already loaded"):
        engine.add_lora(LoRARequest("qv4", str(adapters["qv4"])))
    assert engine.list_loras() == ["qv4"]
    first = llm.generate([[5, 6, 7]], PARAMS, lora_request=LoRARequest("qv4"))[0].outputs[0].token_ids
    assert engine.remove_lora("qv4") and not engine.remove_lora("qv4") and engine.list_loras() == []
    # a request naming a path registers the adapter on first use (vLLM's LoRARequest); a fresh id
    again = llm.generate([[5, 6, 7]], PARAMS, lora_request=LoRARequest("qv4", str(adapters["qv4"])))
    assert again[0].outputs[0].token_ids == first
    stats = engine.get_stats()
    assert stats.lora_requests_total == {"qv4": 2} and stats.lora_generation_tokens_total == {"qv4": 8}
    assert stats.lora_prompt_tokens_total == {"qv4": 6} and stats.max_lora == 1


def test_without_enable_lora_a_lora_request_is_refused(base):
    llm = LLM(base, device="cpu", dtype="float32", max_model_len=64, num_blocks=16)
    with pytest.raises(ValueError, match="without enable_lora"):
        llm.generate([[5, 6]], PARAMS, lora_request=LoRARequest("x"))
    with pytest.raises(ValueError, match="lora_modules needs enable_lora"):
        LLM(base, device="cpu", lora_modules={"x": "/nowhere"})
    with pytest.raises(ValueError, match="max_cpu_loras .* at least max_loras"):
        LLM(base, device="cpu", enable_lora=True, max_loras=3, max_cpu_loras=2)


def test_scheduler_runs_at_most_max_loras_adapters_and_an_in_use_slot_is_never_evicted(base, adapters):
    llm = make_llm(base, max_loras=1, lora_modules={"a": str(adapters["attn8"]), "b": str(adapters["qv4"])})
    engine = llm.llm_engine
    prompts = random_prompts([6, 9, 4, 8], seed=9)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
                           lora_request=LoRARequest("ab"[i % 2]))  # fmt: skip
    engine.add_request("base", [7, 8, 9], PARAMS)  # the base model runs beside either adapter
    running_sets, done = [], set()
    while engine.has_unfinished_requests():
        for out in engine.step():
            done.add(out.request_id) if out.finished else None
        running = engine.scheduler.running_adapters()
        running_sets.append(running)
        for lora_id in running:  # whatever runs holds its slot
            assert engine.lora.slot_of(lora_id) is not None
    assert done == {"0", "1", "2", "3", "base"}
    assert all(len(s) <= 1 for s in running_sets) and {len(s) for s in running_sets} >= {1}
    assert engine.lora.num_slot_loads >= 2
