"""InferenceService end to end on the local cluster: the real operator process against a real API
server; kwok plays the kubelet (pods Ready at once, lmforge.dev/fate for failures), and a tiny
HTTP server in this test process stands in for the pods' /metrics (vLLM metric text we control),
reached through the object's lmforge.dev/metrics-url annotation."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlparse

import pytest

if TYPE_CHECKING:
    from lmforge.devcluster.pipeline import OperatorProcess

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "e2e-inferenceservice"
MODEL = "/models/llama"  # a plain path (hostPath): kwok has no PVCs to bind


class FakeMetrics:
    """vLLM /metrics for every pod: `waiting` queued requests each (per-pod overrides possible);
    remembers when each value was first served, to time the operator's reaction."""

    def __init__(self) -> None:
        self.waiting = 0.0
        self.running = 1.0
        self.first_served: dict[float, float] = {}  # value -> monotonic time of the first scrape that saw it
        self.lock = threading.Lock()
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                pod = parse_qs(urlparse(self.path).query).get("pod", ["?"])[0]
                with metrics.lock:
                    value, running = metrics.waiting, metrics.running
                    metrics.first_served.setdefault(value, time.monotonic())
                body = (
                    f'# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{{model_name="{pod}"}} {value}\n'
                    f'# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{model_name="{pod}"}} {running}\n'
                    f'# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{{model_name="{pod}"}} 0.1\n'
                )
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/metrics?pod={{pod}}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def set(self, waiting: float) -> float:
        """Change the metric; returns when (monotonic)."""
        with self.lock:
            self.waiting = waiting
            self.first_served.pop(waiting, None)
            return time.monotonic()


@pytest.fixture(scope="module")
def operator(cluster, operator_process) -> Iterator[OperatorProcess]:
    """`lmforge operator run --standalone` watching the module's namespace."""
    cluster.kubectl("apply", "-f", str(ROOT / "crds"))
    cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/inferenceservices.lmforge.dev"
    )
    cluster.kubectl("create", "namespace", NAMESPACE, check=False)
    op = operator_process(namespace=NAMESPACE, name="isvc")
    # leftovers of an earlier session on a reused cluster: gone before we start (kopf's finalizer
    # on InferenceServices, for the timer, needs the operator running to let them go)
    cluster.kubectl("delete", "lmisvc", "--all", "-n", NAMESPACE, "--timeout=60s")
    yield op
    cluster.kubectl("delete", "lmisvc", "--all", "-n", NAMESPACE, "--timeout=60s", check=False)
    op.stop()


@pytest.fixture(scope="module")
def fake_metrics() -> Iterator[FakeMetrics]:
    metrics = FakeMetrics()
    yield metrics
    metrics.httpd.shutdown()


class Services:
    """kubectl shortcuts for InferenceServices in one namespace."""

    def __init__(self, cluster, wait_for, operator: OperatorProcess) -> None:
        self.cluster, self.wait_for, self.operator = cluster, wait_for, operator

    def manifest(self, name: str, annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
        return {
            "apiVersion": "lmforge.dev/v1alpha1",
            "kind": "InferenceService",
            "metadata": {"name": name, "namespace": NAMESPACE, "annotations": annotations or {}},
            "spec": {"model": {"source": MODEL}, **spec},
        }

    def apply(
        self, name: str, annotations: dict[str, str] | None = None, check: bool = True, **spec: Any
    ) -> subprocess.CompletedProcess:
        return self.cluster.kubectl(
            "apply", "-f", "-", input=json.dumps(self.manifest(name, annotations, **spec)), check=check
        )

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.cluster.kubectl("-n", NAMESPACE, *args, check=check)

    def get(self, kind: str, name: str) -> dict[str, Any]:
        return self.cluster.kubectl_json("get", "-n", NAMESPACE, kind, name)

    def status(self, name: str) -> dict[str, Any]:
        return self.get("inferenceservice", name).get("status") or {}

    def replicas(self, name: str) -> int:
        return self.get("deployment", name)["spec"]["replicas"]

    def pods(self, name: str) -> list[dict[str, Any]]:
        items = self.cluster.kubectl_json(
            "get", "pods", "-n", NAMESPACE, "-l", f"lmforge.dev/inferenceservice={name}"
        )
        return [p for p in items["items"] if not p["metadata"].get("deletionTimestamp")]

    def wait_status(self, name: str, timeout: float = 60, **want: Any) -> dict[str, Any]:
        def match() -> dict[str, Any] | None:
            status = self.status(name)
            return status if all(status.get(k) == v for k, v in want.items()) else None

        return self.wait_for(
            match,
            timeout=timeout,
            interval=0.5,
            message=lambda: f"{name}: status never had {want}: {self.status(name)}\n{self.operator.tail()}",
        )

    def events(self, name: str) -> list[dict[str, Any]]:
        items = self.cluster.kubectl_json(
            "get",
            "events",
            "-n",
            NAMESPACE,
            "--field-selector",
            f"involvedObject.name={name},involvedObject.kind=InferenceService",
        )["items"]
        return sorted(items, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")

    def reasons(self, name: str) -> list[str]:
        return [e["reason"] for e in self.events(name)]


@pytest.fixture
def services(cluster, wait_for, operator) -> Services:
    return Services(cluster, wait_for, operator)


def test_apply_builds_deployment_service_pdb_and_becomes_ready(services: Services, cluster) -> None:
    cluster.kubectl(
        "create",
        "secret",
        "generic",
        "chat-key",
        "-n",
        NAMESPACE,
        "--from-literal=api-key=s3cret",
        check=False,
    )
    services.apply(
        "chat",
        replicas=2,
        model={"source": MODEL, "servedName": "llama", "maxModelLen": 4096},
        engine={"maxNumSeqs": 64, "prefixCaching": False},
        apiKeySecret={"name": "chat-key"},
    )
    status = services.wait_status("chat", phase="Ready", readyReplicas=2, timeout=90)
    assert status["url"] == f"http://chat.{NAMESPACE}.svc.cluster.local/v1"
    assert status["selector"] == "lmforge.dev/inferenceservice=chat"
    assert status["replicas"] == 2 and status["observedGeneration"] == 1
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Ready": "True",
        "Progressing": "False",
        "Degraded": "False",
    }

    deployment = services.get("deployment", "chat")
    assert deployment["metadata"]["ownerReferences"][0]["kind"] == "InferenceService"
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    command = container["command"]
    assert command[:2] == ["lmforge", "serve"]
    flags = dict(zip(command[2::2], command[3::2], strict=False))
    assert {
        k: flags[k]
        for k in ("--model", "--served-model-name", "--max-model-len", "--max-num-seqs", "--host", "--port")
    } == {
        "--model": MODEL,
        "--served-model-name": "llama",
        "--max-model-len": "4096",
        "--max-num-seqs": "64",
        "--host": "0.0.0.0",
        "--port": "8000",
    }
    assert "--no-enable-prefix-caching" in command
    probe = container["startupProbe"]
    assert (
        probe["httpGet"]["path"] == "/health" and probe["periodSeconds"] * probe["failureThreshold"] >= 1200
    )
    assert container["livenessProbe"]["httpGet"]["path"] == "/version"
    assert container["lifecycle"]["preStop"] == {"sleep": {"seconds": 5}}
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 60
    env = {e["name"]: e for e in container["env"]}
    assert env["LMFORGE_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "chat-key", "key": "api-key"}}

    service = services.get("service", "chat")
    assert [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [
        ("http", 80, "http")
    ]
    assert services.get("pdb", "chat")["spec"]["maxUnavailable"] == 1
    assert "Applied" in services.reasons("chat") and "Ready" in services.reasons("chat")


def test_printer_columns(services: Services) -> None:
    services.wait_status("chat", phase="Ready")
    out = services.kubectl("get", "lmisvc", "chat").stdout.splitlines()
    assert out[0].split() == ["NAME", "PHASE", "READY", "REPLICAS", "URL", "AGE"]
    assert out[1].split()[:5] == ["chat", "Ready", "2", "2", f"http://chat.{NAMESPACE}.svc.cluster.local/v1"]
    wide = services.kubectl("get", "lmisvc", "chat", "-o", "wide").stdout.splitlines()
    assert wide[0].split()[-2:] == ["MODEL", "ADAPTERS"]  # ADAPTERS: "sql 2/2, ..." (none here)
    assert wide[1].split()[-1] == MODEL  # an absent status.adaptersSummary prints as an empty cell


def test_kubectl_scale_and_drift_repair(services: Services, wait_for) -> None:
    services.kubectl("scale", "lmisvc/chat", "--replicas=3")
    wait_for(lambda: services.replicas("chat") == 3, timeout=30, message=services.operator.tail)
    services.wait_status("chat", phase="Ready", readyReplicas=3, replicas=3)
    services.kubectl("scale", "deployment/chat", "--replicas=1")  # behind the operator's back
    wait_for(
        lambda: services.replicas("chat") == 3 and "ReplicasRestored" in services.reasons("chat"),
        timeout=30,
        message=services.operator.tail,
    )


def test_failed_pod_is_reported_and_replaced(services: Services, wait_for) -> None:
    victim = services.pods("chat")[0]["metadata"]["name"]
    services.kubectl("annotate", "pod", victim, "lmforge.dev/fate=fail-1")
    failure = wait_for(
        lambda: (
            (services.status("chat").get("lastFailure") or {}).get("pod") == victim
            and services.status("chat")["lastFailure"]
        ),
        timeout=30,
        message=services.operator.tail,
    )
    assert failure["exitCode"] == 1 and failure["reason"] == "Error"
    assert failure["message"] == "lmforge.dev/fate=fail-1"
    wait_for(lambda: "PodFailed" in services.reasons("chat"), timeout=15)
    services.wait_status("chat", readyReplicas=3)  # the ReplicaSet replaced it


def test_bad_specs_are_rejected(services: Services) -> None:
    cases = [
        ({"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}, "minReplicas must not exceed maxReplicas"),
        ({"autoscaling": {"maxReplicas": 2, "metric": "kvCache", "target": 2}}, "target must be in (0, 1]"),
        ({"model": {"source": "ftp://x/y"}}, "must be pvc://"),
        ({"model": {"source": "s3://UPPER/llama"}}, "with a valid bucket name"),
        ({"startupTimeoutSeconds": 5}, "startupTimeoutSeconds"),
    ]
    for spec, message in cases:
        result = services.apply("bad", check=False, **spec)
        assert result.returncode != 0 and message in result.stderr, (spec, result.stderr)
    result = services.apply("x" * 51, check=False)
    assert result.returncode != 0 and "at most 50 characters" in result.stderr


def test_specs_the_cluster_cannot_run_fail_with_a_reason(services: Services) -> None:
    services.apply("badvolume", volumes=[{"name": "Not_A_DNS_Label", "emptyDir": {}}])  # passed through as is
    status = services.wait_status("badvolume", phase="Failed", timeout=30)
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "InvalidSpec" and "the API server refused an owned object" in ready["message"]
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "InvalidSpec")
    assert "InvalidSpec" in services.reasons("badvolume")
    # Failed never changes (#18): a fixed spec does not revive it; deleting and re-creating does
    services.apply("badvolume", volumes=[{"name": "scratch", "emptyDir": {}}])
    time.sleep(3)
    assert services.status("badvolume")["phase"] == "Failed"
    services.kubectl("delete", "lmisvc", "badvolume", "--wait=true", "--timeout=60s")
    services.apply("badvolume", volumes=[{"name": "scratch", "emptyDir": {}}])
    services.wait_status("badvolume", phase="Ready", timeout=60)
    services.kubectl("delete", "lmisvc", "badvolume", "--wait=false")


def _wait_replicas(services: Services, name: str, want: int, timeout: float) -> float:
    """Poll the Deployment fast; returns the monotonic time the change was seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if services.replicas(name) == want:
            return time.monotonic()
        time.sleep(0.05)
    raise AssertionError(f"{name}: Deployment never reached {want} replicas\n{services.operator.tail()}")


def test_autoscaler_scales_up_and_down_on_engine_metrics(
    services: Services, fake_metrics: FakeMetrics, wait_for
) -> None:
    down_window = 10
    services.apply(
        "auto",
        annotations={"lmforge.dev/metrics-url": fake_metrics.url},
        replicas=1,
        autoscaling={
            "minReplicas": 1,
            "maxReplicas": 4,
            "metric": "queue",
            "target": 4,
            "scaleUpStabilizationSeconds": 0,
            "scaleDownStabilizationSeconds": down_window,
            "maxScaleDownStep": 2,
        },
    )
    services.wait_status("auto", phase="Ready", readyReplicas=1, timeout=60)
    wait_for(
        lambda: (services.status("auto").get("autoscaling") or {}).get("currentMetricValue") == 0,
        timeout=30,
        message=services.operator.tail,
    )

    changed = fake_metrics.set(12.0)  # 12 waiting on 1 replica, target 4/replica -> 3 replicas
    seen_up = _wait_replicas(services, "auto", 3, timeout=30)
    fake_metrics.set(4.0)  # at target: hold
    scraped_up = fake_metrics.first_served[12.0]
    services.wait_status("auto", phase="Ready", readyReplicas=3, timeout=30)

    changed_down = fake_metrics.set(0.0)
    seen_down = _wait_replicas(services, "auto", 1, timeout=60)
    services.wait_status("auto", readyReplicas=1, replicas=1, timeout=30)

    status = services.status("auto")
    history = [(h["fromReplicas"], h["toReplicas"]) for h in status["history"]]
    assert history == [(1, 3), (3, 1)], status["history"]
    assert status["history"][0]["reason"] == "queue 12/replica > target 4: wants 3; 1 -> 3"
    assert status["history"][1]["reason"].startswith("queue 0/replica < target 4: wants 1")
    assert status["autoscaling"]["lastScaleTime"] == status["history"][1]["time"]
    scale_events = [e for e in services.events("auto") if e["reason"] in ("ScaledUp", "ScaledDown")]
    assert [e["reason"] for e in scale_events] == ["ScaledUp", "ScaledDown"]
    assert scale_events[0]["message"] == status["history"][0]["reason"]

    up_latency, down_latency = seen_up - changed, seen_down - changed_down
    report = (
        f"decision latency: scale-up {up_latency:.2f}s after the metric changed "
        f"({seen_up - scraped_up:.2f}s after the first scrape that saw it); scale-down {down_latency:.2f}s "
        f"with a {down_window}s down-window"
    )
    print(report)
    interval = 5.0  # the operator's scrape/decide period (LMFORGE_AUTOSCALER_INTERVAL_SECONDS)
    assert up_latency <= interval + 3, report
    assert down_window <= down_latency <= down_window + 2 * interval + 3, report


def test_scale_to_zero_and_wake_by_kubectl_scale(
    services: Services, fake_metrics: FakeMetrics, wait_for
) -> None:
    fake_metrics.set(0.0)
    fake_metrics.running = 0.0  # idle: no request waiting or running anywhere
    services.apply(
        "idle",
        annotations={"lmforge.dev/metrics-url": fake_metrics.url},
        autoscaling={"minReplicas": 0, "maxReplicas": 2, "scaleDownStabilizationSeconds": 5},
    )
    status = services.wait_status("idle", phase="Ready", timeout=60)
    cond = next(c for c in status["conditions"] if c["type"] == "ScaleToZero")
    assert cond["reason"] == "ColdStartAfterIdle" and "no activator yet" in cond["message"]
    _wait_replicas(services, "idle", 0, timeout=40)
    services.wait_status("idle", phase="ScaledToZero", replicas=0, readyReplicas=0, timeout=30)
    assert "ScaledDown" in services.reasons("idle")
    fake_metrics.running = 1.0  # busy again once it is up
    services.kubectl(
        "scale", "deployment/idle", "--replicas=1"
    )  # the documented wake-up until an activator exists
    services.wait_status("idle", phase="Ready", readyReplicas=1, timeout=30)
    time.sleep(12)  # two decisions later: not undone, the autoscaler goes on from the Deployment's size
    assert services.replicas("idle") == 1, services.status("idle")
    services.kubectl("delete", "lmisvc", "idle", "--wait=false")
