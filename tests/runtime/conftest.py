"""Shared fixtures for the runtime tests: a fake engine (AsyncLLM unit tests, no torch) and real
`lmforge serve` processes on a tiny random model (server tests)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

from lmforge.devcluster.s3server import S3Server
from lmforge.runtime.outputs import CompletionOutput, RequestOutput
from lmforge.runtime.sampling_params import SamplingParams

REPO_ROOT = Path(__file__).resolve().parents[2]


# --- a fake LLMEngine: same API, pure Python, deterministic ------------------------------------------


@dataclass
class _FakeRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    outputs: list[list[int]] = field(default_factory=list)  # per sample
    num_blocks: int = 0
    finished: bool = False


class FakeEngine:
    """Continuous batching over a block counter. Sample j of a request emits tokens
    (last_prompt_token + j + k) % 50, text 'a'..'z' per token; finishes "length" at max_tokens.
    Records the thread of every call in `threads`."""

    def __init__(
        self,
        num_blocks: int = 64,
        block_size: int = 4,
        max_model_len: int = 64,
        max_num_seqs: int = 4,
        step_delay_s: float = 0.0,
        vocab_size: int = 384,
    ) -> None:
        self.num_total_blocks = self.num_free_blocks = num_blocks
        self.block_size, self.max_model_len, self.max_num_seqs = block_size, max_model_len, max_num_seqs
        self.step_delay_s = step_delay_s
        self.waiting: list[_FakeRequest] = []
        self.running: list[_FakeRequest] = []
        self.threads: set[int] = set()
        self.fail_steps = 0  # the next this-many steps raise
        self.generation_tokens = 0
        self.model_config = SimpleNamespace(max_model_len=max_model_len, vocab_size=vocab_size)

    def _touch(self) -> None:
        self.threads.add(threading.get_ident())

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        self._touch()
        ids = [ord(ch) % 50 for ch in prompt] if isinstance(prompt, str) else list(prompt)
        if len(ids) > self.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens is longer than max_model_len {self.max_model_len}")
        self.waiting.append(_FakeRequest(request_id, ids, params))

    def abort_request(self, request_id: str) -> None:
        self._touch()
        for queue in (self.waiting, self.running):
            for req in list(queue):
                if req.request_id == request_id:
                    queue.remove(req)
                    self.num_free_blocks += req.num_blocks

    def has_unfinished_requests(self) -> bool:
        self._touch()
        return bool(self.waiting or self.running)

    def _blocks_needed(self, req: _FakeRequest) -> int:
        tokens = len(req.prompt_ids) + max((len(o) for o in req.outputs), default=0) + 1
        return -(-tokens // self.block_size) * req.params.n - req.num_blocks

    def step(self) -> list[RequestOutput]:
        self._touch()
        if self.fail_steps:
            self.fail_steps -= 1
            raise RuntimeError("injected step failure")
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        while self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if self._blocks_needed(req) > self.num_free_blocks:
                break
            self.waiting.pop(0)
            req.outputs = [[] for _ in range(req.params.n)]
            self.running.append(req)
        results = []
        for req in list(self.running):
            need = self._blocks_needed(req)
            req.num_blocks += need
            self.num_free_blocks -= need
            for j, out in enumerate(req.outputs):
                out.append((req.prompt_ids[-1] + j + len(out)) % 50 if req.prompt_ids else j)
                self.generation_tokens += 1
            done = len(req.outputs[0]) >= (req.params.max_tokens or self.max_model_len)
            if done:
                self.running.remove(req)
                self.num_free_blocks += req.num_blocks
            completions = [
                CompletionOutput(
                    index=j,
                    text="".join(chr(97 + t % 26) for t in out),
                    token_ids=out,
                    logprobs=[{t: -0.5} for t in out] if req.params.logprobs is not None else None,
                    finish_reason="length" if done else None,
                )
                for j, out in enumerate(req.outputs)
            ]
            results.append(RequestOutput(req.request_id, None, req.prompt_ids, completions, finished=done))
        return results

    def get_stats(self) -> dict:
        self._touch()
        return {
            "num_running": len(self.running),
            "num_waiting": len(self.waiting),
            "kv_cache_usage": 1 - self.num_free_blocks / self.num_total_blocks,
            "num_free_blocks": self.num_free_blocks,
            "num_total_blocks": self.num_total_blocks,
            "generation_tokens_total": self.generation_tokens,
        }


@pytest.fixture
def fake_engine_cls() -> type[FakeEngine]:
    return FakeEngine


# --- real server processes ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lmforge.runtime.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    log_path: Path
    api_key: str | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, **kwargs):
        import httpx

        return httpx.get(self.base_url + path, timeout=30, **kwargs)

    def post(self, path: str, **kwargs):
        import httpx

        headers = kwargs.pop("headers", {})
        if self.api_key:
            headers.setdefault("Authorization", f"Bearer {self.api_key}")
        return httpx.post(self.base_url + path, timeout=60, headers=headers, **kwargs)

    def metrics(self) -> dict[str, float]:
        """Sample name with labels -> value, from /metrics."""
        values = {}
        for line in self.get("/metrics").text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def metric(self, prefix: str) -> float:
        """Sum of every sample whose name (without labels) is `prefix`."""
        return sum(v for k, v in self.metrics().items() if k.split("{")[0] == prefix)

    def openai(self, **kwargs):
        import openai

        return openai.OpenAI(
            base_url=self.base_url + "/v1",
            api_key=self.api_key or "unused",
            max_retries=0,
            timeout=60,
            **kwargs,
        )

    def wait_healthy(self, timeout_s: float = 120.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not healthy after {timeout_s}s:\n{self.log()}")

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


# `lmforge serve` with FakeEngine in place of LLMEngine (the server's own tokenizer is still real).
_FAKE_SERVE = """
import argparse, asyncio, importlib.util, json, sys
spec = importlib.util.spec_from_file_location("runtime_conftest", sys.argv[1])
conftest = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(conftest)
from lmforge.runtime.serve_args import add_serve_arguments
from lmforge.runtime.server import serve_async
fake_kwargs = json.loads(sys.argv[2])
args = add_serve_arguments(argparse.ArgumentParser()).parse_args(sys.argv[3:])
sys.exit(asyncio.run(serve_async(args, lambda: conftest.FakeEngine(**fake_kwargs))))
"""


def start_server(
    model_dir: Path,
    log_dir: Path,
    *extra: str,
    api_key: str | None = None,
    wait: bool = True,
    fake_engine: dict | None = None,
) -> ServerProcess:
    """A `lmforge serve` process; with `fake_engine` (FakeEngine kwargs), one without torch."""
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    if fake_engine is None:
        launcher = [sys.executable, "-P", "-m", "lmforge.cli", "serve"]
    else:
        launcher = [sys.executable, "-P", "-c", _FAKE_SERVE, __file__, json.dumps(fake_engine)]
    cmd = [
        *launcher,
        "--model",
        str(model_dir),
        "--port",
        str(port),
        "--served-model-name",
        "tiny",
        "--device",
        "cpu",
        "--max-model-len",
        "256",
        "--log-level",
        "info",
        *extra,
    ]
    if api_key:
        cmd += ["--api-key", api_key]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("LMFORGE_API_KEY", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    server = ServerProcess(proc, port, log_path, api_key)
    if wait:
        try:
            server.wait_healthy()
        except BaseException:
            server.stop()
            raise
    return server


@pytest.fixture(scope="session")
def launch_server() -> Callable[..., ServerProcess]:
    """`start_server` itself, for module-scoped fixtures (conftest is not importable by name)."""
    return start_server


@pytest.fixture
def server_factory(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Starts servers on the tiny model; stops whatever is still running at teardown."""
    started: list[ServerProcess] = []

    def make(
        *extra: str, api_key: str | None = None, wait: bool = True, fake_engine: dict | None = None
    ) -> ServerProcess:
        server = start_server(
            tiny_model_dir, tmp_path, *extra, api_key=api_key, wait=wait, fake_engine=fake_engine
        )
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server shared by every test that only sends requests (~10 s to start on 2 busy cores).
    A small KV pool (512 blocks x 16 tokens) so that any leaked block shows in /metrics."""
    proc = start_server(tiny_model_dir, tmp_path_factory.mktemp("server"), "--num-blocks", "512")
    yield proc
    assert proc.stop() == 0, proc.log()


# --- a real S3 API server on loopback (moto in server mode), the AWS environment pointed at it -------


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = s3_server.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "LMFORGE_S3_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LMFORGE_S3_CHUNK_BYTES", str(64 * 1024))  # several chunks per test file
    return env
