"""`lmforge serve --enable-lora` end to end through the official openai client: `model` picks the adapter,
/v1/models lists adapters with their parent, adapters load and unload at run time (API key enforced;
bad ones are a 400 naming the file), and /metrics carries vLLM's LoRA info gauge and per-adapter counters."""

from __future__ import annotations

import argparse

import pytest

from lmforge import LLM, LoRARequest, SamplingParams
from lmforge.runtime.serve_args import add_serve_arguments
from lmforge.runtime.serve_startup import unsupported_model_flags

KEY = "sekrit"
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def lora_server(base, adapters, launch_server, tmp_path_factory):
    server = launch_server(
        base, tmp_path_factory.mktemp("lora-server"), "--num-blocks", "128", "--enable-lora",
        "--lora-modules", f"attn8={adapters['attn8']}", "--max-loras", "2", "--max-lora-rank", "16",
        "--allow-runtime-lora-updating", api_key=KEY,
    )  # fmt: skip
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def offline(base, adapters) -> dict[str | None, str]:
    """The same engine in-process: greedy text of PROMPT for the base and each adapter."""
    llm = LLM(base, device="cpu", dtype="float32", max_model_len=256, num_blocks=64, enable_lora=True, max_loras=2,
              lora_modules={"attn8": str(adapters["attn8"]), "all16": str(adapters["all16"])})  # fmt: skip
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    names = [None, "attn8", "all16"]
    outs = llm.generate([PROMPT] * 3, params, lora_request=[n and LoRARequest(n) for n in names])
    return {n: o.outputs[0].text for n, o in zip(names, outs, strict=True)}


def _complete(client, model: str) -> str:
    out = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.model == model
    return out.choices[0].text


def test_model_picks_the_adapter_and_models_lists_it(lora_server, offline):
    client = lora_server.openai()
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"tiny", "attn8"}
    assert cards["attn8"].parent == "tiny" and cards["attn8"].root.endswith("attn8")
    assert getattr(cards["tiny"], "parent", None) is None
    assert client.models.retrieve("attn8").parent == "tiny"
    assert _complete(client, "attn8") == offline["attn8"]
    assert _complete(client, "tiny") == offline[None]
    assert offline["attn8"] != offline[None]
    chat = client.chat.completions.create(
        model="attn8", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert chat.model == "attn8" and chat.choices[0].message.content is not None


def test_load_and_unload_at_run_time(lora_server, adapters, offline, tmp_path):
    client = lora_server.openai()
    body = {"lora_name": "all16", "lora_path": str(adapters["all16"])}
    assert (
        lora_server.post(
            "/v1/load_lora_adapter", json=body, headers={"Authorization": "Bearer wrong"}
        ).status_code
        == 401
    )
    r = lora_server.post("/v1/load_lora_adapter", json=body)
    assert r.status_code == 200, r.text
    assert "all16" in {m.id for m in client.models.list().data}
    assert _complete(client, "all16") == offline["all16"]
    again = lora_server.post("/v1/load_lora_adapter", json=body)
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    missing = lora_server.post(
        "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path / "nope")}
    )
    assert missing.status_code == 400 and str(tmp_path / "nope") in missing.json()["error"]["message"]
    assert lora_server.post("/v1/unload_lora_adapter", json={"lora_name": "all16"}).status_code == 200
    with pytest.raises(Exception) as err:
        _complete(client, "all16")
    assert getattr(err.value, "status_code", None) == 404
    assert lora_server.post("/v1/unload_lora_adapter", json={"lora_name": "all16"}).status_code == 404
    assert _complete(client, "attn8") == offline["attn8"]  # the others keep serving


def test_bad_adapter_is_a_400_naming_the_file(lora_server, adapters, tmp_path):
    import json
    import shutil

    path = shutil.copytree(adapters["qv4"], tmp_path / "dora")
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    r = lora_server.post("/v1/load_lora_adapter", json={"lora_name": "dora", "lora_path": str(path)})
    assert r.status_code == 400
    assert (
        r.json()["error"]["message"]
        == f"{path / 'adapter_config.json'}: use_dora=True is not supported (it changes the adapter's math)"
    )


def test_lora_metrics(lora_server):
    _complete(lora_server.openai(), "attn8")
    metrics = lora_server.metrics()
    info = [k for k in metrics if k.startswith("vllm:lora_requests_info{")]
    assert len(info) == 1 and 'max_lora="2"' in info[0]
    assert metrics['lmforge:lora_requests_total{lora_name="attn8",model_name="tiny"}'] >= 1
    assert metrics['lmforge:lora_generation_tokens_total{lora_name="attn8",model_name="tiny"}'] >= 10


def test_operator_sync_plan_converges_on_a_real_replica(lora_server, adapters):
    """The operator's pure plan (operator/adapter_sync.py), read from and applied to this server's endpoints,
    brings it to the desired adapters in one pass; a second plan is empty."""
    import httpx

    from lmforge.operator.adapter_sync import plan, served_adapters

    def served() -> dict[str, dict[str, str]]:
        body = httpx.get(
            lora_server.base_url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}
        ).json()
        return {"pod-0": served_adapters(body, "tiny")}

    assert served() == {"pod-0": {"attn8": str(adapters["attn8"])}}
    desired = {"qv4": str(adapters["qv4"]), "mlp8rs": str(adapters["mlp8rs"])}
    for action in plan(desired, served()):
        body = {"lora_name": action.name, **({"lora_path": action.path} if action.verb == "load" else {})}
        assert lora_server.post(f"/v1/{action.verb}_lora_adapter", json=body).status_code == 200
    assert served() == {"pod-0": desired} and plan(desired, served()) == []
    restore = {"attn8": str(adapters["attn8"])}
    for action in plan(restore, served()):
        body = {"lora_name": action.name, **({"lora_path": action.path} if action.verb == "load" else {})}
        assert lora_server.post(f"/v1/{action.verb}_lora_adapter", json=body).status_code == 200
    assert served() == {"pod-0": restore}


def test_runtime_updates_are_off_without_the_flag(server_factory):
    server = server_factory(fake_engine={})
    assert server.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/x"}).status_code == 404


@pytest.mark.parametrize(
    "flags,problem",
    [(["--lora-modules", "a=/x"], "--lora-modules needs --enable-lora"),
     (["--enable-lora", "--lora-modules", "a"], "--lora-modules 'a': expected name=path"),
     (["--enable-lora", "--lora-modules", "m=/x"], "--lora-modules name 'm' is also a served model name"),
     (["--enable-lora", "--lora-modules", '{"name": "a"}'], "expected JSON"),
     (["--allow-runtime-lora-updating"], "--allow-runtime-lora-updating needs --enable-lora")],
)  # fmt: skip
def test_flag_problems_are_named(tmp_path, flags, problem):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    args = add_serve_arguments(argparse.ArgumentParser()).parse_args(["--model", str(tmp_path / "m"), *flags])
    assert problem in (unsupported_model_flags(args) or "")
