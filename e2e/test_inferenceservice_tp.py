"""An InferenceService with `engine.tensorParallelSize: 2` on the local process node: the operator builds
a pod running `lmforge serve --tensor-parallel-size 2` (nvidia.com/gpu: 0, so the two ranks run on CPU
over gloo, with /dev/shm as a memory-backed emptyDir), the pod becomes Ready, status.parallelism shows
the layout, and the official openai client gets a chat completion from it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmforge.devcluster import pipeline
from lmforge.devcluster.node.cli import endpoints
from lmforge.devcluster.node.node import NODE_NAME
from lmforge.runtime.models.tiny import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = f"e2e-tp-{uuid.uuid4().hex[:6]}"
NAME = "tp-chat"


@pytest.fixture(scope="module")
def env(cluster, tmp_path_factory) -> Iterator[tuple[pipeline.Kube, Path, Path]]:
    kube = pipeline.Kube.of(cluster.info)
    pipeline.apply_crds(kube, ROOT / "crds")
    directory, logs = tmp_path_factory.mktemp("tp"), tmp_path_factory.mktemp("tp-logs")
    kube("create", "namespace", NAMESPACE)
    started = [pipeline.start_node(kube, logs / "node", logs / "node.log")]
    try:
        started.append(pipeline.start_operator(kube, NAMESPACE, logs / "operator.log", pipeline.free_port()))
        yield kube, directory, logs
    finally:
        if len(started) == 2:
            kube(
                "delete",
                "inferenceservices.lmforge.dev",
                NAME,
                "-n",
                NAMESPACE,
                "--wait=true",
                "--timeout=60s",
                check=False,
            )
        for process in reversed(started):
            pipeline.stop(process)
        kube("delete", "namespace", NAMESPACE, "--wait=false", check=False)
        kube("delete", "node", NODE_NAME, "--wait=false", check=False)


def _diagnostics(kube: pipeline.Kube, logs: Path) -> str:
    containers = "".join(
        f"\n--- {log.relative_to(logs)}\n{pipeline.log_tail(log, 2000)}"
        for log in sorted((logs / "node" / "pods").glob("*/logs/*/*.log"))
    )
    pods = kube("get", "pods", "-n", NAMESPACE, "-o", "wide", check=False)
    return f"\n--- pods\n{pods}{containers}\n--- operator.log\n{pipeline.log_tail(logs / 'operator.log')}"


def _ready(kube: pipeline.Kube) -> dict | None:
    status = pipeline.status_of(kube, "inferenceservices.lmforge.dev", NAME, NAMESPACE)
    return status if status.get("phase") == "Ready" else None


@pytest.mark.slow
def test_tensor_parallel_service_answers_a_chat_completion(env) -> None:
    kube, directory, logs = env
    model = save_tiny_model(directory / "tiny", "llama")
    kube.apply(
        [
            {
                "apiVersion": "lmforge.dev/v1alpha1",
                "kind": "InferenceService",
                "metadata": {"name": NAME, "namespace": NAMESPACE},
                "spec": {
                    "model": {"source": f"hostPath://{model}", "dtype": "float32", "maxModelLen": 256},
                    "engine": {"tensorParallelSize": 2, "maxNumSeqs": 8},
                    "resources": {"limits": {"nvidia.com/gpu": 0}},  # CPU ranks (gloo)
                    "nodeSelector": {pipeline.NODE_TYPE_LABEL: "process"},
                    "tolerations": [
                        {
                            "key": "lmforge.dev/process-node",
                            "operator": "Equal",
                            "value": "true",
                            "effect": "NoSchedule",
                        }
                    ],
                },
            }
        ]
    )
    try:
        status = pipeline.wait(lambda: _ready(kube), 300, f"InferenceService {NAME} Ready", interval=2)
        found = pipeline.wait(
            lambda: endpoints(kube.env.get("KUBECONFIG"), NAMESPACE, NAME), 60, "a ready endpoint"
        )
    except pipeline.PipelineError as error:
        pytest.fail(f"{error}{_diagnostics(kube, logs)}")
    assert status["parallelism"] == {
        "tensorParallelSize": 2,
        "gpusPerReplica": 0,
        "layout": "1 replica x TP=2 (CPU)",
    }
    pod = kube.json("get", "pods", "-n", NAMESPACE, "-l", f"lmforge.dev/inferenceservice={NAME}")["items"][0]
    container = pod["spec"]["containers"][0]
    assert container["command"][-2:] == ["--tensor-parallel-size", "2"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]

    from openai import OpenAI

    client = OpenAI(base_url=f"http://{found[0]}/v1", api_key="none", max_retries=2, timeout=60)
    reply = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0
    )
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content
    assert reply.usage.completion_tokens > 0
    node_logs = "".join(p.read_text() for p in (logs / "node" / "pods").glob("*/logs/*/*.log"))
    assert "tensor parallel: 2 ranks (gloo" in node_logs
