"""Progress: the annotation payload, the 10 s throttle, the stdout line, and the pod patch against a
tiny local HTTP server standing in for the API server."""

from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lmforge.runtime.train.progress import (
    ANNOTATION,
    BackgroundSender,
    PodAnnotator,
    ProgressReporter,
    Throttle,
    eta_seconds,
    progress_payload,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class RecordingSender:
    def __init__(self) -> None:
        self.patches: list[dict] = []
        self.closed = False

    def submit(self, payload: dict) -> None:
        self.patches.append(payload)

    def close(self) -> None:
        self.closed = True


def test_payload_and_eta() -> None:
    assert eta_seconds(step=30, total_steps=100, start_step=10, elapsed_s=40.0) == 140  # 2 s/step x 70
    assert eta_seconds(step=10, total_steps=100, start_step=10, elapsed_s=5.0) is None
    assert progress_payload(
        step=30,
        total_steps=100,
        loss=1.23456789,
        tokens_per_second=1234.567,
        eta=140,
        epoch=0.3,
        last_checkpoint="/ckpt/step-00000020",
    ) == {
        "step": 30,
        "totalSteps": 100,
        "loss": 1.234568,
        "tokensPerSecond": 1234.6,
        "eta": 140,
        "etaSeconds": 140,
        "epoch": 0.3,
        "lastCheckpoint": "/ckpt/step-00000020",
    }
    assert (
        progress_payload(
            step=1,
            total_steps=2,
            loss=float("nan"),
            tokens_per_second=None,
            eta=None,
            epoch=None,
            last_checkpoint=None,
        )["loss"]
        is None
    )


def test_throttle() -> None:
    clock = FakeClock()
    throttle = Throttle(10.0, clock)
    assert throttle.ready()
    clock.now += 9.9
    assert not throttle.ready()
    assert throttle.ready(force=True)
    clock.now += 9.9
    assert not throttle.ready()
    clock.now += 0.1
    assert throttle.ready()


def test_reporter_lines_and_throttled_annotations() -> None:
    clock, out, annotator = FakeClock(), io.StringIO(), RecordingSender()
    reporter = ProgressReporter(
        total_steps=8, start_step=0, log_every_steps=2, sender=annotator, out=out, clock=clock
    )
    for step in range(1, 9):
        clock.now += 1.0  # one step per second, 100 tokens each
        reporter.step(step, loss=float(10 - step), tokens=100, epoch=step / 8, lr=1e-3)
        if step == 4:
            reporter.checkpoint("/ckpt/step-00000004")
    reporter.close()
    lines = [line for line in out.getvalue().splitlines() if line.startswith("train")]
    assert len(lines) == 5  # the first step, then every 2nd
    assert "4/8 [00:04<00:04" in lines[2] and "loss=6.5000" in lines[2] and "tok/s=100" in lines[2]
    assert "saved checkpoint /ckpt/step-00000004" in out.getvalue()
    # The first line's payload goes out at once; the next ones only after 10 s, the last one forced.
    assert [p["step"] for p in annotator.patches] == [1, 8] and annotator.closed
    assert annotator.patches[-1] == {
        "step": 8,
        "totalSteps": 8,
        "loss": 2.5,
        "tokensPerSecond": 100.0,
        "eta": 0,
        "etaSeconds": 0,
        "epoch": 1.0,
        "lastCheckpoint": "/ckpt/step-00000004",
    }


def test_sender_survives_api_errors() -> None:
    class Failing:
        namespace, pod = "ns", "p"

        def patch(self, annotations: dict[str, str]) -> None:
            raise ConnectionError("apiserver down")

    logged: list[str] = []
    sender = BackgroundSender(Failing(), log=logged.append)  # type: ignore[arg-type]
    for step in range(3):
        sender.submit({"step": step})
    sender.close()
    assert len(logged) == 1 and "cannot annotate pod ns/p with progress: apiserver down" in logged[0]


class FakeApiServer(BaseHTTPRequestHandler):
    requests: list[tuple[str, str, dict, dict]] = []

    def do_PATCH(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeApiServer.requests.append((self.path, self.headers["Authorization"], dict(self.headers), body))
        payload = json.dumps({"kind": "Pod", "apiVersion": "v1", "metadata": {"name": "w-0"}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def api_server():
    FakeApiServer.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeApiServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("use_client", [False, True], ids=["https-fallback", "kubernetes-client"])
def test_patch_reaches_the_api_server(api_server: str, tmp_path: Path, use_client: bool) -> None:
    if use_client:
        pytest.importorskip("kubernetes")
    token = tmp_path / "token"
    token.write_text("tok-1\n")
    annotator = PodAnnotator("team-a", "ft-0", api_server, token, use_client=use_client)
    annotator.patch({ANNOTATION: '{"step":1}'})
    token.write_text("tok-2\n")  # rotated service-account token
    annotator.patch({ANNOTATION: '{"step":2}'})
    (path, auth, _, body), (_, auth2, _, body2) = FakeApiServer.requests
    assert path == "/api/v1/namespaces/team-a/pods/ft-0"
    assert (auth, auth2) == ("Bearer tok-1", "Bearer tok-2")
    assert body == {"metadata": {"annotations": {ANNOTATION: '{"step":1}'}}}
    assert body2["metadata"]["annotations"][ANNOTATION] == '{"step":2}'


def test_annotator_from_env(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("t")
    (tmp_path / "namespace").write_text("team-b\n")
    env = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443", "POD_NAME": "ft-0"}
    annotator = PodAnnotator.from_env(env, sa_dir=tmp_path)
    assert annotator is not None
    assert (annotator.namespace, annotator.pod, annotator.api_url) == (
        "team-b",
        "ft-0",
        "https://10.0.0.1:443",
    )
    assert PodAnnotator.from_env({**env, "POD_NAMESPACE": "x"}, sa_dir=tmp_path).namespace == "x"
    assert PodAnnotator.from_env({"POD_NAME": "ft-0"}, sa_dir=tmp_path) is None  # not in a cluster
    assert PodAnnotator.from_env(env, sa_dir=tmp_path / "none") is None  # no service account token
    assert PodAnnotator.from_env({**env, "LMFORGE_PROGRESS_ANNOTATION": "0"}, sa_dir=tmp_path) is None
