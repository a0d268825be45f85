"""`make demo`: the whole product on one machine, narrated.

Steps: local Kubernetes (built from Go on first use) -> CRDs -> the operator -> example custom
resources with their status -> the inference runtime answering a chat completion through the
official `openai` client. Leaves the cluster running so the user can keep exploring; stops the
processes it started itself.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from lmforge.operator.localcluster import cluster as local_cluster
from lmforge.operator.localcluster import paths

ROOT = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
DEMO_DIR = paths.cache_root() / "demo"
STEPS = 6


def step(number: int, title: str) -> None:
    print(f"\n\033[1m[{number}/{STEPS}] {title}\033[0m", flush=True)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


class Kubectl:
    def __init__(self, info: local_cluster.ClusterInfo) -> None:
        self.info = info

    def __call__(self, *args: str, show: bool = True) -> str:
        out = subprocess.run([str(self.info.kubectl), *args], env=self.info.env(), check=True,
                             capture_output=True, text=True).stdout
        if show:
            print(f"$ kubectl {' '.join(args)}\n{out.rstrip()}")
        return out

    def json(self, *args: str) -> dict:
        return json.loads(self(*args, "-o", "json", show=False))


def start_background(name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    log = open(DEMO_DIR / f"{name}.log", "w")
    print(f"$ {' '.join(cmd)}  (log: {log.name})")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def run_operator(info: local_cluster.ClusterInfo) -> subprocess.Popen:
    port = free_port()
    op = start_background("operator", [str(BIN / "lmforge"), "operator", "run", "--liveness-port", str(port)],
                          info.env())
    wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), 90, "the operator's liveness endpoint")
    print(f"operator running (pid {op.pid}), liveness http://127.0.0.1:{port}/healthz")
    return op


def show_resources(kubectl: Kubectl) -> None:
    # The PVCs the examples mount come first.
    for example in [ROOT / "examples" / "storage" / "volumes.yaml", *sorted((ROOT / "examples").glob("*.yaml"))]:
        kubectl("apply", "-f", str(example))

    def trainjob_running() -> bool:
        items = kubectl.json("get", "trainjobs.lmforge.dev")["items"]
        return bool(items) and all(i.get("status", {}).get("phase") == "Running" for i in items)

    wait_until(trainjob_running, 90, "the example TrainJob to reach phase Running")
    kubectl("get", "lmforge")
    kubectl("get", "pods", "-o", "wide")


def serve_and_ask() -> None:
    from lmforge.runtime.models.tiny import save_tiny_model
    from openai import OpenAI

    model_dir = DEMO_DIR / "tiny-llama"
    if not (model_dir / "config.json").exists():
        save_tiny_model(model_dir, arch="llama")
    port = free_port()
    server = start_background("server", [str(BIN / "lmforge"), "serve", "--model", str(model_dir),
                                         "--served-model-name", "tiny-llama", "--port", str(port)],
                              dict(os.environ))
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/health"), 180, "lmforge serve to load the model")
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        question = "Say hello to Kubernetes."
        reply = client.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": question}], max_tokens=24, temperature=0,
        )
        print(f"user:      {question}")
        print(f"assistant: {reply.choices[0].message.content!r}  (random weights: the words are noise, the path is real)")
        print(f"usage:     {reply.usage.model_dump()}")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            lines = [ln for ln in r.read().decode().splitlines()
                     if ln.startswith(("vllm:generation_tokens_total", "vllm:kv_cache_usage_perc"))]
        print("\n".join(lines))
    finally:
        stop(server)


def main() -> int:
    step(1, "local Kubernetes: etcd, kube-apiserver, controller-manager, scheduler, kwok (4 nodes x 8 GPUs)")
    info = local_cluster.up(log=print)
    kubectl = Kubectl(info)
    kubectl("get", "nodes")

    step(2, "custom resource definitions")
    kubectl("apply", "-f", str(ROOT / "crds"))

    step(3, "the lmforge operator")
    operator = run_operator(info)
    try:
        step(4, "example TrainJob, InferenceService and QuantizeJob (pods simulated by kwok)")
        show_resources(kubectl)

        step(5, "the inference runtime: lmforge serve + the openai client")
        serve_and_ask()
    finally:
        step(6, "done")
        stop(operator)
    print(f"The cluster keeps running. Try:\n  export KUBECONFIG={info.kubeconfig}\n"
          f"  {info.kubectl} get lmforge\n  {BIN / 'lmforge'} operator run   # reconcile again\n"
          f"  {BIN / 'lmforge'} cluster down   # stop everything")
    return 0


if __name__ == "__main__":
    sys.exit(main())
