"""The `make demo` pipeline as a test, on the local process node: a TrainJob fine-tunes a tiny
Llama on 2 worker processes (50 steps), a QuantizeJob writes it as W4A16 compressed-tensors and
its serveAfter InferenceService serves it on the same node, and the official openai client gets a
chat completion from it. Same steps as demo.py (lmforge.devcluster.pipeline), in a fresh
namespace and a temporary directory; the node agent and the operator run once for the module."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmforge.devcluster import pipeline
from lmforge.devcluster.node.node import NODE_NAME

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = f"e2e-pipeline-{uuid.uuid4().hex[:6]}"


class Env:
    def __init__(self, kube: pipeline.Kube, directory: Path, logs: Path) -> None:
        self.kube, self.directory, self.logs = kube, directory, logs

    def diagnostics(self) -> str:
        return pipeline.diagnostics(self.kube, NAMESPACE, self.logs)


@pytest.fixture(scope="module")
def env(cluster, tmp_path_factory) -> Iterator[Env]:
    kube = pipeline.Kube.of(cluster.info)
    pipeline.apply_crds(kube, ROOT / "crds")
    directory, logs = tmp_path_factory.mktemp("pipeline"), tmp_path_factory.mktemp("pipeline-logs")
    pipeline.prepare(kube, NAMESPACE, directory)
    started = [pipeline.start_node(kube, logs / "node", logs / "node.log")]
    try:  # the demo's own start_operator (pipeline.OperatorProcess, as the operator_process fixture)
        started.append(pipeline.start_operator(kube, NAMESPACE, logs / "operator.log", pipeline.free_port()))
        yield Env(kube, directory, logs)
    finally:
        if len(started) == 2:  # while the operator runs: its finalizers let the resources go
            try:
                pipeline.delete_resources(kube, NAMESPACE, timeout=60)
            except pipeline.PipelineError:
                pass
        for process in reversed(started):
            pipeline.stop(process)
        kube("delete", "namespace", NAMESPACE, "--wait=false", check=False)
        kube("delete", "node", NODE_NAME, "--wait=false", check=False)


@pytest.mark.slow
def test_train_quantize_serve_chat(env: Env) -> None:
    kube, directory = env.kube, env.directory
    try:
        trained = pipeline.train(kube, NAMESPACE, directory, timeout=600)
    except pipeline.PipelineError as error:
        pytest.fail(f"{error}{env.diagnostics()}")
    progress = trained["progress"]
    assert (progress["step"], progress["totalSteps"], progress["summary"]) == (50, 50, "50/50")
    assert (directory / "tuned" / "model.safetensors").exists()

    try:
        quantized = pipeline.quantize(kube, NAMESPACE, directory, timeout=300)
    except pipeline.PipelineError as error:
        pytest.fail(f"{error}{env.diagnostics()}")
    result = quantized["result"]
    assert set(result) == {"sizeBytesBefore", "sizeBytesAfter", "klDivergence", "top1Agreement", "outputPath"}
    assert 0 < result["sizeBytesAfter"] < result["sizeBytesBefore"]
    assert 0 <= result["klDivergence"] < 0.1 and 0.5 < result["top1Agreement"] <= 1
    assert result["outputPath"] == f"hostPath://{directory / 'tuned-w4a16'}"
    config = json.loads((directory / "tuned-w4a16" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    assert quantized["inferenceService"] == pipeline.SERVICE

    isvc = kube.json("get", "inferenceservices.lmforge.dev", pipeline.SERVICE, "-n", NAMESPACE)
    assert isvc["spec"]["nodeSelector"] == {
        pipeline.NODE_TYPE_LABEL: "process"
    }  # placed like the QuantizeJob
    try:
        served, endpoint = pipeline.serve(kube, NAMESPACE, timeout=300)
    except pipeline.PipelineError as error:
        pytest.fail(f"{error}{env.diagnostics()}")
    assert served["phase"] == "Ready"
    pods = kube.json(
        "get", "pods", "-n", NAMESPACE, "-l", f"lmforge.dev/inferenceservice={pipeline.SERVICE}"
    )["items"]
    assert pods and all(p["spec"]["nodeName"] == NODE_NAME for p in pods), [
        p["spec"].get("nodeName") for p in pods
    ]

    reply = pipeline.chat(endpoint, "Say hello.", max_tokens=8)
    assert reply.model == pipeline.SERVICE
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content
    assert reply.usage.completion_tokens > 0
