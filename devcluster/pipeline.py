"""Inputs and manifests of the train -> quantize -> serve pipeline on the process node, shared by
`make demo` and e2e/test_localnode.py: a tiny random Llama, a tiny chat JSONL, the workers'
ServiceAccount (rank 0 annotates its pod with progress) and the examples/demo manifests with
${DEMO_DIR} filled in; and the background processes (node agent, operator: OperatorProcess, which
the e2e suites' `operator_process` fixture hands out too)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import yaml

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "demo"
WORKER_SERVICE_ACCOUNT = "lmforge-worker"
PAIRS = [
    ("What is Kubernetes?", "A system that runs containers on many machines."),
    ("What does an operator do?", "It turns a custom resource into running pods."),
    ("Say hello.", "Hello from lmforge!"),
    ("What is a TrainJob?", "A gang of worker pods that fine-tunes a model."),
]


def write_inputs(directory: Path) -> Path:
    """tiny-llama/ (random init, HF layout) and chat.jsonl, made once."""
    directory.mkdir(parents=True, exist_ok=True)
    model = directory / "tiny-llama"
    if not (model / "config.json").exists():
        from lmforge.runtime.models.tiny import save_tiny_model

        save_tiny_model(model, arch="llama")
    data = directory / "chat.jsonl"
    if not data.exists():
        rows = [
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in PAIRS * 8
        ]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def render(name: str, directory: Path, namespace: str | None = None) -> list[dict[str, Any]]:
    """examples/demo/<name> with ${DEMO_DIR} substituted."""
    text = string.Template((EXAMPLES / name).read_text()).safe_substitute(DEMO_DIR=str(directory))
    docs = [d for d in yaml.safe_load_all(text) if d]
    if namespace:
        for doc in docs:
            doc.setdefault("metadata", {})["namespace"] = namespace
    return docs


def worker_rbac(namespace: str) -> list[dict[str, Any]]:
    """The workers' ServiceAccount; `patch` on pods for the progress annotation."""
    meta = {"name": WORKER_SERVICE_ACCOUNT, "namespace": namespace}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta,
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "patch"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta,
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": WORKER_SERVICE_ACCOUNT,
            },
            "subjects": [{"kind": "ServiceAccount", "name": WORKER_SERVICE_ACCOUNT, "namespace": namespace}],
        },
    ]


# --- the pipeline's steps (demo.py and e2e/test_pipeline.py) -----------------------------------------

NODE_TYPE_LABEL = "lmforge.dev/node-type"
TRAINJOB, QUANTIZEJOB, SERVICE = "demo-tune", "demo-w4a16", "demo-chat"  # names in examples/demo/*.yaml
OUTPUTS = ("tuned", "tuned-w4a16")  # what the TrainJob and the QuantizeJob write under the directory


class PipelineError(RuntimeError):
    """A step failed or timed out; the message says which and shows the status."""


class Kube:
    """The real kubectl against one cluster (ClusterInfo-like: `.kubectl`, `.env()`)."""

    def __init__(self, kubectl: Path | str, env: dict[str, str]) -> None:
        self.kubectl, self.env = str(kubectl), env

    @classmethod
    def of(cls, info: Any) -> Self:
        return cls(info.kubectl, info.env())

    def __call__(self, *args: str, check: bool = True, input: str | None = None, timeout: float = 120) -> str:
        result = subprocess.run(
            [self.kubectl, *args], input=input, capture_output=True, text=True, env=self.env, timeout=timeout
        )
        if check and result.returncode != 0:
            raise PipelineError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def json(self, *args: str) -> dict[str, Any]:
        return json.loads(self(*args, "-o", "json"))

    def apply(self, docs: list[dict[str, Any]]) -> str:
        return self("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))


def wait(
    predicate: Callable[[], Any], timeout: float, what: str | Callable[[], str], interval: float = 0.5
) -> Any:
    """Poll until `predicate` returns something truthy (exceptions count as 'not yet')."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = predicate()
            if result:
                return result
        except (PipelineError, OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise PipelineError(
                f"timed out after {timeout:.0f}s waiting for {what() if callable(what) else what}"
            )
        time.sleep(interval)


def start_process(
    cmd: list[str], log_path: Path, env: dict[str, str], append: bool = False
) -> subprocess.Popen:
    """A background process in its own session (stop() signals the whole group), output to log_path."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a" if append else "w") as log:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # exited (and reaped) since the caller looked
        os.killpg(process.pid, signum)


def stop(process: subprocess.Popen, timeout: float = 30) -> int:
    """SIGTERM to the process group, SIGKILL after `timeout` seconds; returns the exit code."""
    if process.poll() is None:
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait()
    return process.returncode


def kill(process: subprocess.Popen, timeout: float = 10) -> int:
    """SIGKILL to the process group (no shutdown handlers run: a crash); returns the exit code."""
    if process.poll() is None:
        _signal_group(process, signal.SIGKILL)
        process.wait(timeout)
    return process.returncode


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def diagnostics(kube: Kube, namespace: str, logs: Path) -> str:
    """What a failed e2e step prints: the namespace's pods, each process-node container's log tail,
    the operator's and the node agent's logs (all under `logs`, as start_operator/start_node write them)."""
    pods = kube("get", "pods", "-n", namespace, "-o", "wide", check=False)
    containers = "".join(
        f"\n--- {log.relative_to(logs)}\n{log_tail(log, 1500)}"
        for log in sorted((logs / "node" / "pods").glob("*/logs/*/*.log"))
    )
    return (
        f"\n--- pods\n{pods}{containers}\n--- operator.log\n{log_tail(logs / 'operator.log')}"
        f"\n--- node.log\n{log_tail(logs / 'node.log')}"
    )


def log_tail(path: Path, chars: int = 3000) -> str:
    """The last `chars` characters of a log file (all of it for 0); "" when there is none."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-chars:] if chars else text


def start_node(kube: Kube, state_dir: Path, log_path: Path, timeout: float = 60) -> subprocess.Popen:
    """`lmforge node run` in the background; returns once node lmforge-local is Ready and untainted."""
    from lmforge.devcluster.node.node import NODE_NAME

    proc = start_process(
        [sys.executable, "-P", "-m", "lmforge.devcluster.node", "--state-dir", str(state_dir), "run"],
        log_path,
        kube.env,
    )

    def schedulable() -> bool:
        if proc.poll() is not None:
            raise SystemExit(f"the node agent exited ({proc.returncode}):\n{log_tail(log_path)}")
        body = kube.json("get", "node", NODE_NAME)
        conditions = (body.get("status") or {}).get("conditions") or ()
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
        taints = {t["key"] for t in (body.get("spec") or {}).get("taints") or ()}
        return ready and "node.kubernetes.io/not-ready" not in taints

    try:
        wait(schedulable, timeout, lambda: f"node {NODE_NAME} to be Ready:\n{log_tail(log_path)}")
    except BaseException:
        stop(proc)
        raise
    return proc


class OperatorProcess:
    """`lmforge operator run` in the background (its own process group), its output (JSON log
    lines) in a file. Restartable: start() after stop() or kill() appends to the same log, with a
    `--- restart N` line between runs. The one operator wrapper of the demo and the e2e tests."""

    def __init__(
        self, env: dict[str, str], log_path: Path, args: tuple[str, ...] = (), liveness_port: int = 0
    ) -> None:
        self.env, self.log_path, self.liveness_port = env, log_path, liveness_port
        self.cmd = [
            str(Path(sys.executable).parent / "lmforge"),
            "operator",
            "run",
            "--liveness-port",
            str(liveness_port),
            *args,
        ]
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> OperatorProcess:
        if self.running():
            assert self.proc is not None  # running() says so
            raise RuntimeError(f"the operator is running already (pid {self.proc.pid})")
        self.starts += 1
        if self.starts > 1:
            with open(self.log_path, "a") as log:
                log.write(f"--- restart {self.starts}\n")
        self.proc = start_process(self.cmd, self.log_path, self.env, append=self.starts > 1)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        """Whether its liveness endpoint answers 200 (needs a liveness_port)."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=2
            ) as response:
                return response.status == 200
        except OSError:
            return False

    def wait_healthy(self, timeout: float = 90) -> None:
        """Until its liveness endpoint answers. An operator that exits first ends the wait at once
        with SystemExit (wait() takes a PipelineError for 'not yet')."""

        def healthy() -> bool:
            if not self.running():
                returncode = self.proc.returncode if self.proc is not None else None
                raise SystemExit(f"the operator exited ({returncode}):\n{self.tail()}")
            return self.healthy()

        wait(healthy, timeout, lambda: f"the operator's liveness endpoint:\n{self.tail()}")

    def kill(self) -> int | None:
        """SIGKILL: the operator dies mid-work, as in a node crash or an OOM kill."""
        return kill(self.proc) if self.proc else None

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM (SIGKILL after `timeout` seconds); returns the exit code, None if never started."""
        return stop(self.proc, timeout) if self.proc else None

    def logs(self) -> str:
        """Everything it wrote, over all its runs."""
        return log_tail(self.log_path, chars=0)

    def tail(self, chars: int = 20000) -> str:
        """The end of its log, for failure messages."""
        return log_tail(self.log_path, chars)

    def __enter__(self) -> OperatorProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_operator(
    kube: Kube,
    namespace: str,
    log_path: Path,
    liveness_port: int,
    extra_args: tuple[str, ...] = (),
    timeout: float = 90,
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """`lmforge operator run -n <namespace>` with the workers' ServiceAccount (progress and result
    annotations); returns once its liveness endpoint answers."""
    env = {
        **kube.env,
        "LMFORGE_WORKER_SERVICE_ACCOUNT": WORKER_SERVICE_ACCOUNT,
        "LMFORGE_QUANTIZEJOB_INTERVAL_SECONDS": "1",
        **(extra_env or {}),
    }
    operator = OperatorProcess(env, log_path, ("-n", namespace, *extra_args), liveness_port).start()
    try:
        operator.wait_healthy(timeout)
    except BaseException:
        operator.stop()
        raise
    assert operator.proc is not None  # start() launched it
    return operator.proc


def apply_crds(kube: Kube, crds: Path, timeout: float = 60) -> str:
    """`kubectl apply -f crds/`, then wait until the API server serves the three kinds (a CRD
    just created has no status for a moment: `kubectl wait` would fail, not wait)."""
    out = kube("apply", "-f", str(crds))
    wait(
        lambda: kube(
            "wait",
            "--for=condition=Established",
            "--timeout=10s",
            "crd/trainjobs.lmforge.dev",
            "crd/quantizejobs.lmforge.dev",
            "crd/inferenceservices.lmforge.dev",
            timeout=20,
        ),
        timeout,
        "the lmforge CRDs to be Established",
    )
    return out


def prepare(kube: Kube, namespace: str, directory: Path) -> None:
    """Namespace, the workers' ServiceAccount, inputs on disk; no outputs of an earlier run."""
    if kube("get", "namespace", namespace, check=False).strip() == "":
        kube("create", "namespace", namespace)
    kube.apply(worker_rbac(namespace))
    write_inputs(directory)
    for name in OUTPUTS:
        shutil.rmtree(directory / name, ignore_errors=True)


def delete_resources(kube: Kube, namespace: str, timeout: float = 120) -> list[str]:
    """Delete the pipeline's custom resources (an earlier run's; the operator must be running: its
    finalizers let them go) and wait until their pods are gone. Returns what was deleted."""
    kinds = ("inferenceservices.lmforge.dev", "quantizejobs.lmforge.dev", "trainjobs.lmforge.dev")
    existing = kube("get", ",".join(kinds), "-n", namespace, "-o", "name", check=False).split()
    if existing:
        kube(
            "delete",
            *existing,
            "-n",
            namespace,
            "--wait=true",
            f"--timeout={int(timeout)}s",
            timeout=timeout + 10,
        )
        wait(
            lambda: not kube.json("get", "pods", "-n", namespace)["items"],
            timeout,
            lambda: f"the old pods in {namespace} to go: {kube('get', 'pods', '-n', namespace, check=False)}",
        )
    return existing


def status_of(kube: Kube, kind: str, name: str, namespace: str) -> dict[str, Any]:
    return kube.json("get", kind, name, "-n", namespace).get("status") or {}


def _wait_phase(
    kube: Kube,
    kind: str,
    name: str,
    namespace: str,
    phases: tuple[str, ...],
    timeout: float,
    every: float,
    on_poll: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            status = status_of(kube, kind, name, namespace)
        except PipelineError:
            status = {}
        if on_poll:
            on_poll(status)
        phase = status.get("phase")
        if phase in phases:
            return status
        if phase == "Failed":
            raise PipelineError(f"{kind} {namespace}/{name} failed: {json.dumps(status, indent=1)}")
        if time.monotonic() > deadline:
            raise PipelineError(
                f"timed out after {timeout:.0f}s: {kind} {namespace}/{name} is not "
                f"{' or '.join(phases)}: {json.dumps(status, indent=1)}"
            )
        time.sleep(every)


def port_free(port: int) -> bool:
    """Whether a listener could bind 0.0.0.0:<port> (as rank 0's TCPStore does)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def wait_master_port(timeout: float = 120, log: Callable[[str], None] = print) -> None:
    """Pods on the process node share this machine's ports, and rank 0 listens on 0.0.0.0:29500:
    another torchrun on the machine would fail the job with EADDRINUSE (exit code 1, final), so
    wait for the port first."""
    from lmforge.operator.api.constants import MASTER_PORT

    if not port_free(MASTER_PORT):
        log(f"port {MASTER_PORT} (rank 0's rendezvous) is in use by another process on this machine: waiting")
        wait(lambda: port_free(MASTER_PORT), timeout, f"port {MASTER_PORT} to be free", interval=1)


def train(
    kube: Kube,
    namespace: str,
    directory: Path,
    timeout: float = 600,
    every: float = 2,
    on_poll: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """examples/demo/trainjob.yaml until Succeeded; returns its status."""
    wait_master_port()
    kube.apply(render("trainjob.yaml", directory, namespace))
    return _wait_phase(
        kube, "trainjobs.lmforge.dev", TRAINJOB, namespace, ("Succeeded",), timeout, every, on_poll
    )


def quantize(
    kube: Kube,
    namespace: str,
    directory: Path,
    timeout: float = 300,
    every: float = 2,
    on_poll: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """examples/demo/quantizejob.yaml (W4A16 of the fine-tuned model, serveAfter demo-chat) until
    Succeeded; returns its status."""
    kube.apply(render("quantizejob.yaml", directory, namespace))
    return _wait_phase(
        kube, "quantizejobs.lmforge.dev", QUANTIZEJOB, namespace, ("Succeeded",), timeout, every, on_poll
    )


def serve(
    kube: Kube,
    namespace: str,
    timeout: float = 300,
    every: float = 2,
    on_poll: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, Any], str]:
    """The serveAfter InferenceService until Ready; returns its status and one ready endpoint
    (pod IP:port, reachable from this host)."""
    return serve_named(kube, namespace, SERVICE, timeout, every, on_poll)


def serve_named(
    kube: Kube,
    namespace: str,
    service: str,
    timeout: float = 300,
    every: float = 2,
    on_poll: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, Any], str]:
    """InferenceService `service` until Ready; its status and one ready endpoint (pod IP:port)."""
    from lmforge.devcluster.node.cli import endpoints

    status = _wait_phase(
        kube, "inferenceservices.lmforge.dev", service, namespace, ("Ready",), timeout, every, on_poll
    )
    found = wait(
        lambda: endpoints(kube.env.get("KUBECONFIG"), namespace, service),
        60,
        f"a ready endpoint of Service {namespace}/{service}",
    )
    return status, found[0]


def chat(endpoint: str, question: str, max_tokens: int = 24) -> Any:
    """One chat completion through the official openai client; returns the response."""
    from openai import OpenAI

    client = OpenAI(base_url=f"http://{endpoint}/v1", api_key="none", max_retries=2, timeout=60)
    return client.chat.completions.create(
        model=SERVICE, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0
    )
