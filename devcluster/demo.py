"""`make demo`: the whole product on one machine, narrated, for real.

Steps: local Kubernetes (built from Go on first use) -> CRDs -> the local process node agent (pods
bound to it run as local processes) and the operator -> a TrainJob fine-tunes a tiny Llama on 2
worker processes -> a QuantizeJob writes it as W4A16 compressed-tensors and serves it -> the
InferenceService answers a chat completion through the official `openai` client. The steps
themselves live in lmforge.devcluster.pipeline (e2e/test_pipeline.py runs the same ones).

Idempotent: a rerun first deletes the previous run's resources. At the end the demo deletes its
resources (the checkpoints stay on disk), stops the processes it started (agent, operator) and
leaves the cluster running.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lmforge.devcluster import pipeline
from lmforge.devcluster.cluster import cluster as local_cluster
from lmforge.devcluster.cluster import paths
from lmforge.devcluster.node.node import NODE_NAME

ROOT = Path(__file__).resolve().parents[1]  # the checkout (crds/, examples/)
BIN = Path(sys.executable).parent
DEMO_DIR = paths.cache_root() / "demo"
NAMESPACE = "lmforge-demo"
STEPS = 7
QUESTION = "Say hello."
T0 = time.monotonic()


def step(number: int, title: str) -> None:
    print(f"\n\033[1m[{number}/{STEPS}] {title}\033[0m  (t+{time.monotonic() - T0:.0f}s)", flush=True)


class Kubectl(pipeline.Kube):
    """kubectl that can also print what it ran and what it said."""

    def show(self, *args: str) -> str:
        out = self(*args)
        print(f"$ kubectl {' '.join(args)}\n{out.rstrip()}", flush=True)
        return out


class Table:
    """`kubectl get <kind>` polled: the header once, then the rows whenever something other than
    AGE changed (the PROGRESS column moving while a job runs), and at least every 10 s."""

    def __init__(self, kubectl: Kubectl, kind: str) -> None:
        self.kubectl, self.kind, self.header, self.last, self.shown_at = kubectl, kind, False, "", 0.0

    def __call__(self, _status: dict[str, Any] | None = None) -> None:
        text = self.kubectl("get", self.kind, "-n", NAMESPACE, check=False).rstrip()
        lines = text.splitlines()
        if not lines:
            return
        if not self.header:
            print(
                f"$ kubectl get {self.kind} -n {NAMESPACE}   (every 2 s; a row when it changes)\n{lines[0]}",
                flush=True,
            )
            self.header = True
        rows = lines[1:]
        key = "\n".join(" ".join(row.split()[:-1]) for row in rows)  # without AGE
        if rows and (key != self.last or time.monotonic() - self.shown_at >= 10):
            print("\n".join(rows), flush=True)
            self.last, self.shown_at = key, time.monotonic()


def human(num_bytes: int | None) -> str:
    return "?" if num_bytes is None else f"{num_bytes / 1024:.0f} KiB"


def main() -> int:
    step(
        1,
        "local Kubernetes: etcd, kube-apiserver, controller-manager, scheduler, kwok (4 simulated GPU nodes)",
    )
    info = local_cluster.up(log=print)
    kubectl = Kubectl.of(info)

    step(2, "custom resource definitions")
    out = pipeline.apply_crds(kubectl, ROOT / "crds")
    print(f"$ kubectl apply -f crds/\n{out.rstrip()}")

    step(
        3,
        f"the local process node (pods run as processes on this machine) and the operator (namespace {NAMESPACE})",
    )
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    pipeline.prepare(kubectl, NAMESPACE, DEMO_DIR)  # namespace, worker ServiceAccount, tiny Llama + chat data
    started: list[subprocess.Popen] = []
    failed = True
    try:
        agent_log = DEMO_DIR / "node.log"
        print(f"$ lmforge node run  (log: {agent_log})")
        started.append(pipeline.start_node(kubectl, DEMO_DIR / "node", agent_log))
        operator_log = DEMO_DIR / "operator.log"
        port = pipeline.free_port()
        print(
            f"$ LMFORGE_WORKER_SERVICE_ACCOUNT={pipeline.WORKER_SERVICE_ACCOUNT} lmforge operator run -n {NAMESPACE}"
            f" --liveness-port {port}  (log: {operator_log})"
        )
        started.append(pipeline.start_operator(kubectl, NAMESPACE, operator_log, port))
        print(f"operator running (pid {started[-1].pid}), liveness http://127.0.0.1:{port}/healthz")
        old = pipeline.delete_resources(kubectl, NAMESPACE)
        if old:
            print(f"deleted the previous run's {', '.join(old)}")
        kubectl.show("get", "nodes", "-L", pipeline.NODE_TYPE_LABEL)

        step(
            4,
            f"TrainJob {pipeline.TRAINJOB}: full fine-tune of a tiny random Llama, 2 worker processes"
            " (torchrun, gloo), 50 steps",
        )
        print(f"inputs: {DEMO_DIR / 'tiny-llama'}, {DEMO_DIR / 'chat.jsonl'}")
        print(f"$ kubectl apply -f examples/demo/trainjob.yaml   (${{DEMO_DIR}} = {DEMO_DIR})")
        started_at = time.monotonic()
        status = pipeline.train(kubectl, NAMESPACE, DEMO_DIR, on_poll=Table(kubectl, "trainjobs.lmforge.dev"))
        progress = status.get("progress") or {}
        print(
            f"Succeeded in {time.monotonic() - started_at:.0f}s: step {progress.get('step')}/"
            f"{progress.get('totalSteps')}, loss {progress.get('loss')}, checkpoint in {DEMO_DIR / 'tuned'}"
        )

        step(
            5,
            f"QuantizeJob {pipeline.QUANTIZEJOB}: W4A16 (RTN, group 32) of the fine-tuned model, then serve it",
        )
        print("$ kubectl apply -f examples/demo/quantizejob.yaml")
        started_at = time.monotonic()
        status = pipeline.quantize(
            kubectl, NAMESPACE, DEMO_DIR, on_poll=Table(kubectl, "quantizejobs.lmforge.dev")
        )
        result = status.get("result") or {}
        print(
            f"Succeeded in {time.monotonic() - started_at:.0f}s: {human(result.get('sizeBytesBefore'))} -> "
            f"{human(result.get('sizeBytesAfter'))}, KL(original || W4A16) {result.get('klDivergence')}, "
            f"top-1 agreement {result.get('top1Agreement')}, written to {result.get('outputPath')}"
        )

        step(
            6,
            f"InferenceService {pipeline.SERVICE} (created by serveAfter): lmforge serve on the process node"
            " + the openai client",
        )
        started_at = time.monotonic()
        _, endpoint = pipeline.serve(
            kubectl, NAMESPACE, on_poll=Table(kubectl, "inferenceservices.lmforge.dev")
        )
        print(
            f"Ready in {time.monotonic() - started_at:.0f}s; `lmforge node endpoints {pipeline.SERVICE} -n {NAMESPACE}`"
            f" -> {endpoint}"
        )
        reply = pipeline.chat(endpoint, QUESTION)
        print(
            f"$ OpenAI(base_url='http://{endpoint}/v1').chat.completions.create(model='{pipeline.SERVICE}', ...)"
        )
        print(f"user:      {QUESTION}")
        print(f"assistant: {reply.choices[0].message.content!r}")
        print(
            "           (a random 64-wide Llama after 50 steps on 4 question/answer pairs, in 4 bits: it parrots"
            " its training data, through the real path)"
        )
        print(f"usage:     {reply.usage.model_dump()}")
        kubectl.show("get", "lmforge", "-n", NAMESPACE)
        kubectl.show("get", "pods", "-n", NAMESPACE, "-o", "wide")
        failed = False
    except pipeline.PipelineError as error:
        print(f"\ndemo: {error}", file=sys.stderr)
        print(
            f"pods: kubectl get pods -n {NAMESPACE}; their logs: {BIN / 'lmforge'} node logs <pod> -n {NAMESPACE}"
            f" --state-dir {DEMO_DIR / 'node'}",
            file=sys.stderr,
        )
    finally:
        step(
            7,
            "done: "
            + (
                "stop the node agent and the operator (the failed run's resources stay for a look;"
                " the next run deletes them)"
                if failed
                else "delete the demo's resources, stop the node agent and the operator"
            ),
        )
        if len(started) == 2 and not failed:  # the operator's finalizers let the resources go
            try:
                deleted = pipeline.delete_resources(kubectl, NAMESPACE)
                print(f"deleted {', '.join(deleted) or 'nothing'} in namespace {NAMESPACE}")
            except pipeline.PipelineError as error:
                print(f"could not delete the demo's resources: {error}")
        for process in reversed(started):
            pipeline.stop(process)
        if started:
            kubectl("delete", "node", NODE_NAME, "--wait=false", check=False)
            print(
                f"stopped the operator and the node agent (logs: {DEMO_DIR / 'operator.log'}, {DEMO_DIR / 'node.log'})"
            )
    if failed:
        return 1
    print(
        f"\ndemo finished in {time.monotonic() - T0:.0f}s. Checkpoints stay in {DEMO_DIR}: tiny-llama/, tuned/,"
        f" tuned-w4a16/.\nThe cluster keeps running. Try:\n"
        f"  export KUBECONFIG={info.kubeconfig}\n"
        f"  {BIN / 'lmforge'} serve --model {DEMO_DIR / 'tuned-w4a16'}   # the quantized model, outside Kubernetes\n"
        f"  {BIN / 'lmforge'} node run &  LMFORGE_WORKER_SERVICE_ACCOUNT={pipeline.WORKER_SERVICE_ACCOUNT}"
        f" {BIN / 'lmforge'} operator run -n {NAMESPACE} &\n"
        f"  sed 's|${{DEMO_DIR}}|{DEMO_DIR}|' examples/demo/trainjob.yaml | kubectl apply -n {NAMESPACE} -f -"
        f"   # the pipeline by hand\n"
        f"  {BIN / 'lmforge'} cluster down   # stop the cluster"
    )
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -P -m lmforge.devcluster.demo",
        description=__doc__.split("\n\n")[0],
        epilog="`make demo` installs everything first and then runs this.",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args(sys.argv[1:])
    sys.exit(main())
