"""Multi-LoRA on the local process node, operator half of issue #22: an InferenceService with
engine.lora serves a tiny Llama; a LoRA TrainJob with serveAfter fine-tunes an adapter into the
service's adapterRoots; once it Succeeded the operator loads the adapter over HTTP into the running
replica, and the official openai client gets an answer from it. The pod is never restarted (same UID,
restartCount 0). Prints the time from TrainJob Succeeded (first seen by polling) to the adapter's
first answer."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from lmforge.devcluster import pipeline
from lmforge.devcluster.node.node import NODE_NAME

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = f"e2e-lora-{uuid.uuid4().hex[:6]}"
SERVICE, TRAINJOB, ADAPTER = "lora-chat", "lora-tune", "sql"
PLACEMENT = {
    "nodeSelector": {pipeline.NODE_TYPE_LABEL: "process"},
    "tolerations": [
        {"key": "lmforge.dev/process-node", "operator": "Equal", "value": "true", "effect": "NoSchedule"}
    ],
}


class Env:
    def __init__(self, kube: pipeline.Kube, directory: Path, logs: Path) -> None:
        self.kube, self.directory, self.logs = kube, directory, logs

    def diagnostics(self) -> str:
        return pipeline.diagnostics(self.kube, NAMESPACE, self.logs)

    def apply(self, kind: str, name: str, spec: dict[str, Any]) -> None:
        doc = {
            "apiVersion": "lmforge.dev/v1alpha1",
            "kind": kind,
            "metadata": {"name": name, "namespace": NAMESPACE},
        }
        self.kube.apply([{**doc, "spec": spec}])

    def pod(self) -> dict[str, Any]:
        pods = self.kube.json("get", "pods", "-n", NAMESPACE, "-l", f"lmforge.dev/inferenceservice={SERVICE}")
        assert len(pods["items"]) == 1, [p["metadata"]["name"] for p in pods["items"]]
        return pods["items"][0]


@pytest.fixture(scope="module")
def env(cluster, tmp_path_factory) -> Iterator[Env]:
    kube = pipeline.Kube.of(cluster.info)
    pipeline.apply_crds(kube, ROOT / "crds")
    directory, logs = tmp_path_factory.mktemp("lora"), tmp_path_factory.mktemp("lora-logs")
    pipeline.prepare(kube, NAMESPACE, directory)
    (directory / "adapters").mkdir()
    started = [pipeline.start_node(kube, logs / "node", logs / "node.log")]
    try:
        started.append(pipeline.start_operator(kube, NAMESPACE, logs / "operator.log", pipeline.free_port()))
        yield Env(kube, directory, logs)
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


def _status(env: Env, kind: str, name: str) -> dict[str, Any]:
    return pipeline.status_of(env.kube, kind, name, NAMESPACE)


def _answer(endpoint: str, model: str) -> Any:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://{endpoint}/v1", api_key="none", max_retries=0, timeout=30)
    return client.completions.create(model=model, prompt="What is Kubernetes?", max_tokens=6, temperature=0)


@pytest.mark.slow
def test_trainjob_adapter_is_served_on_the_running_service_without_a_restart(env: Env) -> None:
    directory = env.directory
    env.apply(
        "InferenceService",
        SERVICE,
        {
            "model": {"source": f"hostPath://{directory / 'tiny-llama'}"},
            "engine": {"maxNumSeqs": 8, "lora": {"maxLoras": 2, "maxLoraRank": 8,
                                                  "adapterRoots": [f"hostPath://{directory / 'adapters'}"]}},
            **PLACEMENT,
        },
    )  # fmt: skip
    try:
        _, endpoint = pipeline.serve_named(env.kube, NAMESPACE, SERVICE, timeout=300)
    except pipeline.PipelineError as error:
        pytest.fail(f"{error}{env.diagnostics()}")
    before = env.pod()
    assert _answer(endpoint, SERVICE).choices[0].text is not None  # the base model answers

    pipeline.wait_master_port()
    env.apply(
        "TrainJob",
        TRAINJOB,
        {
            "model": f"hostPath://{directory / 'tiny-llama'}",
            "dataset": {"source": f"hostPath://{directory / 'chat.jsonl'}", "format": "messages"},
            "method": "lora",
            "lora": {"r": 8, "alpha": 16, "targetModules": ["q_proj", "v_proj"]},
            "numNodes": 1,
            "procsPerNode": 1,
            "resourcesPerNode": {"limits": {"cpu": "1"}},
            "hyperparameters": {
                "learningRate": 0.01,
                "maxSteps": 5,
                "batchSize": 2,
                "seqLen": 64,
                "precision": "fp32",
            },
            "output": {"dir": f"hostPath://{directory / 'adapters' / ADAPTER}"},
            "serveAfter": {"inferenceService": SERVICE, "adapterName": ADAPTER},
            "failurePolicy": {"maxRestarts": 1, "backoffSeconds": 1},
            **PLACEMENT,
        },
    )
    deadline = time.monotonic() + 600
    while _status(env, "trainjobs.lmforge.dev", TRAINJOB).get("phase") != "Succeeded":
        if (
            time.monotonic() > deadline
            or _status(env, "trainjobs.lmforge.dev", TRAINJOB).get("phase") == "Failed"
        ):
            pytest.fail(f"TrainJob: {_status(env, 'trainjobs.lmforge.dev', TRAINJOB)}{env.diagnostics()}")
        time.sleep(0.25)
    succeeded = time.monotonic()

    reply, errors = None, []
    while reply is None and time.monotonic() < succeeded + 120:
        try:
            reply = _answer(endpoint, ADAPTER)
        except Exception as error:  # noqa: BLE001 - 404 model not found until the operator loaded it
            errors.append(str(error))
            time.sleep(0.1)
    if reply is None:
        pytest.fail(f"the adapter never answered: {errors[-1:]}{env.diagnostics()}")
    seconds = time.monotonic() - succeeded
    completed = _status(env, "trainjobs.lmforge.dev", TRAINJOB)["completionTime"]  # whole seconds
    since_completion = time.time() - datetime.fromisoformat(completed.replace("Z", "+00:00")).timestamp()
    print(
        json.dumps(
            {  # from the moment this test saw Succeeded (polled every 0.25 s), and from completionTime
                "trainjob_succeeded_seen_to_first_adapter_answer_seconds": round(seconds, 2),
                "trainjob_completion_time_to_first_adapter_answer_seconds_upper_bound": round(
                    since_completion, 2
                ),
            }
        )
    )
    assert reply.model == ADAPTER and reply.usage.completion_tokens > 0

    after = env.pod()
    assert after["metadata"]["uid"] == before["metadata"]["uid"]  # the same pod: not replaced
    assert [s["restartCount"] for s in after["status"]["containerStatuses"]] == [0]
    deadline = time.monotonic() + 30
    while True:
        entries = _status(env, "inferenceservices.lmforge.dev", SERVICE).get("adapters") or []
        if entries and entries[0].get("replicas") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert entries == [
        {
            "name": ADAPTER,
            "path": str(directory / "adapters" / ADAPTER),
            "replicas": [after["metadata"]["name"]],
        }
    ]
    models = {
        m.id: m
        for m in __import__("openai").OpenAI(base_url=f"http://{endpoint}/v1", api_key="n").models.list()
    }
    assert models[ADAPTER].model_dump().get("parent") == SERVICE
