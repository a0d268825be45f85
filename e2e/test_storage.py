"""Models and data from remote storage on the local process node (issue #23): the storage
initializer (`lmforge fetch` in an init container) downloads an hf:// model from the local fake
Hub, and s3:// locations live on a real S3 API server on loopback (moto in server mode); the pods
are real processes, the answers come through the official openai client."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmforge.devcluster import pipeline
from lmforge.devcluster.fakehub import FakeHub
from lmforge.devcluster.node.node import NODE_NAME
from lmforge.devcluster.s3server import S3Server

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = f"e2e-storage-{uuid.uuid4().hex[:6]}"
ON_PROCESS_NODE = {
    "nodeSelector": {pipeline.NODE_TYPE_LABEL: "process"},
    "tolerations": [
        {"key": "lmforge.dev/process-node", "operator": "Equal", "value": "true", "effect": "NoSchedule"}
    ],
}


class Env:
    def __init__(self, kube: pipeline.Kube, directory: Path, logs: Path, hub: FakeHub, s3: S3Server) -> None:
        self.kube, self.directory, self.logs, self.hub, self.s3 = kube, directory, logs, hub, s3

    def diagnostics(self) -> str:
        pods = self.kube("get", "pods", "-n", NAMESPACE, "-o", "wide", check=False)
        containers = "".join(
            f"\n--- {log.relative_to(self.logs)}\n{pipeline.log_tail(log, 1500)}"
            for log in sorted((self.logs / "node" / "pods").glob("*/logs/*/*.log"))
        )
        return (
            f"\n--- pods\n{pods}{containers}\n--- operator.log\n{pipeline.log_tail(self.logs / 'operator.log')}"
            f"\n--- node.log\n{pipeline.log_tail(self.logs / 'node.log')}"
        )

    def apply(self, doc: dict[str, Any]) -> None:
        doc.setdefault("metadata", {})["namespace"] = NAMESPACE
        self.kube.apply([doc])

    def wait_phase(self, kind: str, name: str, phases: tuple[str, ...], timeout: float) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            status = pipeline.status_of(self.kube, kind, name, NAMESPACE)
            if status.get("phase") == "Failed" and "Failed" not in phases:
                raise AssertionError(
                    f"{kind} {name} failed: {json.dumps(status, indent=1)}{self.diagnostics()}"
                )
            return status if status.get("phase") in phases else None

        return pipeline.wait(
            reached,
            timeout,
            lambda: (
                f"{kind} {name} to be {phases}: "
                f"{pipeline.status_of(self.kube, kind, name, NAMESPACE)}{self.diagnostics()}"
            ),
        )

    def endpoint(self, service: str) -> str:
        from lmforge.devcluster.node.cli import endpoints

        return pipeline.wait(
            lambda: endpoints(self.kube.env.get("KUBECONFIG"), NAMESPACE, service),
            60,
            f"a ready endpoint of Service {service}",
        )[0]

    def pods(self, label: str) -> list[dict[str, Any]]:
        return self.kube.json("get", "pods", "-n", NAMESPACE, "-l", label)["items"]


def default_may_annotate_its_pods() -> dict[str, Any]:
    """The storage initializer of an InferenceService pod (the namespace's default ServiceAccount)
    reports progress on its pod: the workers' Role (get/patch pods) bound to `default` too."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "default-annotates-pods", "namespace": NAMESPACE},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": pipeline.WORKER_SERVICE_ACCOUNT,
        },
        "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": NAMESPACE}],
    }


@pytest.fixture(scope="module")
def env(cluster, tmp_path_factory) -> Iterator[Env]:
    kube = pipeline.Kube.of(cluster.info)
    pipeline.apply_crds(kube, ROOT / "crds")
    directory, logs = tmp_path_factory.mktemp("storage"), tmp_path_factory.mktemp("storage-logs")
    pipeline.prepare(kube, NAMESPACE, directory)  # namespace, worker RBAC, tiny-llama/ and chat.jsonl
    kube.apply([default_may_annotate_its_pods()])
    hub = FakeHub.start()
    hub.add_directory("acme/tiny-llama", directory / "tiny-llama")
    s3 = S3Server().start()
    started = [pipeline.start_node(kube, logs / "node", logs / "node.log")]
    try:
        started.append(pipeline.start_operator(kube, NAMESPACE, logs / "operator.log", pipeline.free_port()))
        yield Env(kube, directory, logs, hub, s3)
    finally:
        if len(started) == 2:
            try:
                pipeline.delete_resources(kube, NAMESPACE, timeout=60)
            except pipeline.PipelineError:
                pass
        for process in reversed(started):
            pipeline.stop(process)
        kube("delete", "namespace", NAMESPACE, "--wait=false", check=False)
        kube("delete", "node", NODE_NAME, "--wait=false", check=False)
        hub.stop()
        s3.stop()


def chat(endpoint: str, model: str) -> Any:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://{endpoint}/v1", api_key="none", max_retries=2, timeout=60)
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=6, temperature=0
    )


def inference_service(name: str, source: str, env: list[dict[str, Any]], replicas: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "lmforge.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": name},
        "spec": {
            "model": {"source": source, "maxModelLen": 256},
            "replicas": replicas,
            "env": env,
            "engine": {"maxNumSeqs": 4, "maxNumBatchedTokens": 256},
            **ON_PROCESS_NODE,
        },
    }


@pytest.mark.slow
def test_hf_model_is_fetched_by_the_storage_initializer_and_served(env: Env) -> None:
    """The bug of #23: an hf:// InferenceService crash-looped (`lmforge serve --model org/name`)."""
    hub_env = [{"name": k, "value": v} for k, v in env.hub.env().items()]
    env.apply(inference_service("hf-chat", "hf://acme/tiny-llama", hub_env))
    status = env.wait_phase("inferenceservices.lmforge.dev", "hf-chat", ("Ready",), timeout=300)
    assert status["readyReplicas"] == 1
    [pod] = env.pods("lmforge.dev/inferenceservice=hf-chat")
    assert pod["spec"]["nodeName"] == NODE_NAME
    [init] = pod["status"]["initContainerStatuses"]
    assert (init["name"], init["state"]["terminated"]["exitCode"]) == ("storage-initializer", 0)
    fetch = json.loads(pod["metadata"]["annotations"]["lmforge.dev/fetch"])
    assert (fetch["uri"], fetch["phase"], fetch["cached"]) == ("hf://acme/tiny-llama", "Done", False)
    assert (
        env.hub.downloads()[
            "/acme/tiny-llama/resolve/" + "0123456789abcdef0123456789abcdef01234567" + "/config.json"
        ]
        == 1
    )

    reply = chat(env.endpoint("hf-chat"), "hf-chat")
    assert reply.model == "hf-chat" and reply.usage.completion_tokens > 0
