"""lmforge.runtime.hub against a local fake Hugging Face Hub (lmforge.devcluster.fakehub: an HTTP
server implementing just what `huggingface_hub.snapshot_download` calls for a tiny repo), with
HF_ENDPOINT pointed at it. The real snapshot_download code path runs end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmforge.devcluster.fakehub import SHA, FakeHub
from lmforge.runtime import hub
from lmforge.runtime.train.config import ConfigError, resolve_path

REPOS: dict[tuple[str, str], dict[str, bytes]] = {
    ("models", "acme/tiny"): {
        "config.json": b'{"model_type": "llama"}',
        "tokenizer.json": b"{}",
        "model.gguf": b"not for us",
        "onnx/model.onnx": b"nor this",
    },
    ("datasets", "acme/chat"): {
        "README.md": b"# chat",
        "data/train.jsonl": b'{"text": "hello"}\n',
        "data/train.parquet": b"PAR1",
    },
}


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    state = FakeHub.start(REPOS)
    monkeypatch.setenv("HF_ENDPOINT", state.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    try:
        yield state
    finally:
        state.stop()


def test_model_snapshot_is_downloaded_into_hf_home(fake_hub: FakeHub, tmp_path: Path) -> None:
    path = hub.resolve("hf://acme/tiny")
    assert path.is_relative_to(tmp_path / "hf-home" / "hub" / "models--acme--tiny" / "snapshots")
    assert json.loads((path / "config.json").read_text()) == {"model_type": "llama"}
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "tokenizer.json"]  # no gguf/onnx copies
    assert hub.resolve("hf://acme/tiny") == path  # cached: no second file download
    assert set(fake_hub.downloads().values()) == {1}


def test_dataset_repo_keeps_only_jsonl(fake_hub: FakeHub) -> None:
    path = hub.resolve("hf://acme/chat", repo_type="dataset")
    assert "datasets--acme--chat" in str(path)
    assert [p.relative_to(path).as_posix() for p in sorted(path.rglob("*")) if p.is_file()] == [
        "data/train.jsonl"
    ]
    assert any(p.startswith("/datasets/acme/chat/resolve/") for _, p in fake_hub.requests)


def test_hf_token_is_sent(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    hub.resolve("hf://acme/tiny")
    assert "hf_secret" in fake_hub.token_seen


def test_missing_repo_error_names_the_uri(fake_hub: FakeHub) -> None:
    with pytest.raises(hub.HubError, match=r"model: cannot download hf://acme/nope \(model repo\).*HF_TOKEN"):
        hub.resolve("hf://acme/nope", what="model")


def test_unreachable_endpoint_error_names_the_uri(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    with pytest.raises(hub.HubError, match="cannot download hf://acme/tiny"):
        hub.resolve("hf://acme/tiny")


def test_cache_dir_defaults() -> None:
    assert hub.cache_dir({}) == Path("/tmp/lmforge-hub")
    assert hub.cache_dir({"HF_HOME": "/cache"}) == Path("/cache/hub")
    assert hub.cache_dir({"HF_HOME": "/cache", "HF_HUB_CACHE": "/c2"}) == Path("/c2")


@pytest.mark.parametrize("uri", ["hf://acme", "hf://a/b/c", "/local", "hf:///x"])
def test_bad_uris(uri: str) -> None:
    with pytest.raises(hub.HubError, match="expected hf://<org>/<name>"):
        hub.repo_id(uri)


def test_local_ranks_of_a_node_download_once(fake_hub: FakeHub) -> None:
    """Three processes (torchrun local ranks) resolve the same model at once: the cache lock lets one
    download, the others wait and get the same snapshot without fetching a file again."""
    code = "from lmforge.runtime import hub; print(hub.resolve('hf://acme/tiny'))"
    procs = [
        subprocess.Popen(
            [sys.executable, "-P", "-c", code],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "LOCAL_RANK": str(rank)},
        )
        for rank in range(3)
    ]
    outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert len(set(outputs)) == 1 and Path(outputs[0], "config.json").is_file()
    assert set(fake_hub.downloads().values()) == {1}, fake_hub.downloads()


def test_train_config_resolves_hf_model_and_dataset(fake_hub: FakeHub) -> None:
    model = resolve_path("hf://acme/tiny", "model")
    assert (model / "config.json").is_file()
    dataset = resolve_path("hf://acme/chat", "dataset.source")
    assert (dataset / "data" / "train.jsonl").is_file()
    with pytest.raises(ConfigError, match="output.dir: 'hf://acme/out'"):
        resolve_path("hf://acme/out", "output.dir")


def test_quantize_resolves_hf_model(fake_hub: FakeHub) -> None:
    from lmforge.runtime.quantize.pipeline import resolve_model_dir

    assert (resolve_model_dir("hf://acme/tiny") / "config.json").is_file()


def test_train_worker_exits_1_naming_the_uri_when_the_download_fails(
    fake_hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lmforge.runtime.train import main

    config = tmp_path / "train.json"
    config.write_text(
        json.dumps(
            {
                "model": "hf://acme/missing",
                "dataset": {"source": "hf://acme/chat"},
                "output": {"dir": str(tmp_path / "out")},
            }
        )
    )
    assert main(["--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "lmforge train: download error: model: cannot download hf://acme/missing" in err


def test_fetch_hf_into_a_directory_and_through_the_node_cache(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmforge.runtime.storage.cache import NodeCache
    from lmforge.runtime.storage.transfer import MARKER, fetch

    cache = NodeCache(tmp_path / "cache")
    cold = fetch("hf://acme/tiny", tmp_path / "pod-1", cache=cache, report=lambda p, line: None)
    assert (cold.revision, cold.cached) == (SHA, False)
    files = sorted(p.name for p in (tmp_path / "pod-1").iterdir() if p.name != MARKER)
    assert files == ["config.json", "tokenizer.json"]  # no gguf/onnx copies, no HF cache layout
    requests_before = len(fake_hub.requests)
    warm = fetch("hf://acme/tiny", tmp_path / "pod-2", cache=cache, report=lambda p, line: None)
    assert (warm.cached, warm.revision) == (True, SHA)
    assert len(fake_hub.requests) == requests_before  # a warm start asks the hub nothing
    assert (tmp_path / "pod-2" / "config.json").read_text() == '{"model_type": "llama"}'


def test_fetch_of_a_missing_repo_names_the_uri(fake_hub: FakeHub, tmp_path: Path) -> None:
    from lmforge.runtime.storage.transfer import fetch

    with pytest.raises(hub.HubError, match=r"cannot resolve hf://acme/nope \(model repo\)"):
        fetch("hf://acme/nope", tmp_path / "x", report=lambda p, line: None)


def test_serve_an_hf_model(fake_hub: FakeHub, tiny_model_dir: Path, launch_server, tmp_path: Path) -> None:
    """The bug of issue #23: `lmforge serve --model hf://org/name` exited 2 ('not a model
    directory'). It downloads the repo from the (fake) hub and answers through the openai client."""
    fake_hub.add_directory("acme/tiny-llama", tiny_model_dir)
    server = launch_server("hf://acme/tiny-llama", tmp_path)
    try:
        client = server.openai()
        assert [m.id for m in client.models.list().data] == ["tiny"]
        reply = client.completions.create(model="tiny", prompt="hello", max_tokens=4, temperature=0)
        assert reply.usage.completion_tokens == 4
        assert fake_hub.downloads()["/acme/tiny-llama/resolve/" + SHA + "/config.json"] == 1
    finally:
        server.stop()
