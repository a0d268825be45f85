"""lmforge.runtime.hub against a local fake Hugging Face Hub: an HTTP server implementing just what
`huggingface_hub.snapshot_download` calls for a tiny repo (repo info, tree listing, file HEAD/GET),
with HF_ENDPOINT pointed at it. The real snapshot_download code path runs end to end."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lmforge.runtime import hub
from lmforge.runtime.train.config import ConfigError, resolve_path

SHA = "0123456789abcdef0123456789abcdef01234567"
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


@dataclass
class FakeHub:
    url: str
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    token_seen: list[str | None] = field(default_factory=list)

    def downloads(self) -> Counter[str]:
        return Counter(p for m, p in self.requests if m == "GET" and "/resolve/" in p)


def _handler(state: FakeHub) -> type[BaseHTTPRequestHandler]:  # noqa: C901 - a fake hub's route table
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _send(
            self, status: int, body: bytes, headers: dict[str, str] | None = None, head: bool = False
        ) -> None:
            self.send_response(status)
            for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
                self.send_header(k, v)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _not_found(self, head: bool) -> None:
            self._send(
                404,
                b'{"error": "Repository not found"}',
                {"Content-Type": "application/json", "X-Error-Code": "RepoNotFound"},
                head,
            )

        def _serve(self, head: bool) -> None:
            path = self.path.split("?", 1)[0]
            state.requests.append(("HEAD" if head else "GET", path))
            auth = self.headers.get("Authorization")
            state.token_seen.append(auth.removeprefix("Bearer ") if auth else None)
            if m := re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)(?:/revision/[^/]+)?", path):
                files = REPOS.get((m[1], m[2]))
                if files is None:
                    return self._not_found(head)
                info = {"id": m[2], "sha": SHA, "siblings": [{"rfilename": f} for f in files]}
                return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, head)
            if m := re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)/tree/[^/]+(?:/.*)?", path):
                files = REPOS.get((m[1], m[2]))
                if files is None:
                    return self._not_found(head)
                tree = [
                    {"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                    for f, b in files.items()
                ]
                return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, head)
            if m := re.fullmatch(r"/(datasets/)?([^/]+/[^/]+)/resolve/[^/]+/(.+)", path):
                files = REPOS.get(("datasets" if m[1] else "models", m[2]))
                if files is None or m[3] not in files:
                    return self._not_found(head)
                body = files[m[3]]
                return self._send(
                    200,
                    body,
                    {
                        "X-Repo-Commit": SHA,
                        "ETag": f'"{hashlib.sha1(body).hexdigest()}"',
                        "Content-Type": "application/octet-stream",
                    },
                    head,
                )
            return self._not_found(head)

        def do_GET(self) -> None:  # noqa: N802
            self._serve(head=False)

        def do_HEAD(self) -> None:  # noqa: N802
            self._serve(head=True)

    return Handler


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    state = FakeHub(url="")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", state.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


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
