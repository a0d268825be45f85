"""Admission: the generated CRDs reject bad specs through `kubectl apply` with a message that names
the field, accept the examples, and keep a running gang's shape immutable."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "e2e-crd-validation"
CRD_NAMES = ("trainjobs.lmforge.dev", "inferenceservices.lmforge.dev", "quantizejobs.lmforge.dev")


@pytest.fixture(scope="module")
def crds(cluster):
    cluster.kubectl("apply", "-f", str(ROOT / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{n}" for n in CRD_NAMES))
    cluster.kubectl("create", "namespace", NAMESPACE, check=False)
    return cluster


def trainjob(name: str = "tj", **spec: Any) -> dict[str, Any]:
    base = {
        "model": "pvc://models/llama",
        "dataset": {"source": "pvc://data/train.jsonl"},
        "output": {"dir": "pvc://out/llama"},
    }
    return {
        "apiVersion": "lmforge.dev/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {**base, **spec},
    }


def isvc(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "lmforge.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "svc", "namespace": NAMESPACE},
        "spec": {"model": {"source": "hf://meta-llama/Llama-3.2-1B"}, **spec},
    }


def quantizejob(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "lmforge.dev/v1alpha1",
        "kind": "QuantizeJob",
        "metadata": {"name": "qj", "namespace": NAMESPACE},
        "spec": {"model": "pvc://models/llama", "method": "w8a16", "output": "pvc://out/q", **spec},
    }


def without(obj: dict[str, Any], *path: str) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    node = obj
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return obj


def apply(cluster, obj: dict[str, Any], dry_run: bool = True):
    args = ["apply", "-f", "-"] + (["--dry-run=server"] if dry_run else [])
    return cluster.kubectl(*args, check=False, input=json.dumps(obj))


REJECTED = [
    # (object, fragments that must all appear in kubectl's stderr)
    pytest.param(trainjob(numNodes=0), ["spec.numNodes", "greater than or equal to 1"], id="numNodes-0"),
    pytest.param(
        trainjob(procsPerNode=0), ["spec.procsPerNode", "greater than or equal to 1"], id="procsPerNode-0"
    ),
    pytest.param(
        trainjob(method="qlora"), ["spec.method", 'Unsupported value: "qlora"'], id="unknown-method"
    ),
    pytest.param(
        trainjob(method="full", lora={"r": 8}),
        ["spec.lora", "lora may only be set when method is lora"],
        id="lora-with-method-full",
    ),
    pytest.param(
        trainjob(zeroStage=2),
        ["spec.zeroStage", "zeroStage may only be set when backend is deepspeed"],
        id="zeroStage-with-torchrun",
    ),
    pytest.param(
        trainjob(backend="deepspeed", zeroStage=4),
        ["spec.zeroStage", "less than or equal to 3"],
        id="zeroStage-4",
    ),
    pytest.param(
        trainjob(backend="horovod"), ["spec.backend", 'Unsupported value: "horovod"'], id="unknown-backend"
    ),
    pytest.param(
        trainjob(checkpoint={"everySteps": -5}),
        ["spec.checkpoint.everySteps", "greater than or equal to 1"],
        id="negative-everySteps",
    ),
    pytest.param(trainjob(checkpoint={"keepLast": 0}), ["spec.checkpoint.keepLast"], id="keepLast-0"),
    pytest.param(
        trainjob(model="ftp://host/llama"), ["spec.model", "must be pvc://"], id="bad-model-uri-scheme"
    ),
    pytest.param(
        trainjob(dataset={"source": "data/train.jsonl"}),
        ["spec.dataset.source", "must be pvc://"],
        id="relative-dataset-path",
    ),
    pytest.param(
        trainjob(dataset={"source": "/data/x.jsonl", "format": "csv"}),
        ["spec.dataset.format", 'Unsupported value: "csv"'],
        id="dataset-format-csv",
    ),
    pytest.param(without(trainjob(), "spec", "model"), ["spec.model", "Required value"], id="missing-model"),
    pytest.param(
        trainjob(hyperparameters={"epochs": 2, "maxSteps": 100}),
        ["spec.hyperparameters.maxSteps", "either epochs or maxSteps"],
        id="epochs-and-maxSteps",
    ),
    pytest.param(
        trainjob(hyperparameters={"learningRate": 0}),
        ["spec.hyperparameters.learningRate"],
        id="learningRate-0",
    ),
    pytest.param(trainjob(lora={"r": 8, "dropout": 1.5}), ["spec.lora.dropout"], id="lora-dropout-1.5"),
    pytest.param(
        trainjob(failurePolicy={"maxRestarts": -1}),
        ["spec.failurePolicy.maxRestarts"],
        id="maxRestarts-negative",
    ),
    pytest.param(
        trainjob(failurePolicy={"restartOnExitCodes": [1, 2], "failOnExitCodes": [2]}),
        ["spec.failurePolicy.failOnExitCodes", "both restartOnExitCodes and failOnExitCodes"],
        id="exit-code-in-both-lists",
    ),
    pytest.param(
        trainjob(failurePolicy={"failOnExitCodes": [256]}),
        ["spec.failurePolicy.failOnExitCodes"],
        id="exit-code-256",
    ),
    pytest.param(
        trainjob(method="full", output={"dir": "/out", "mergeAdapter": True}),
        ["spec.output.mergeAdapter", "mergeAdapter may only be true when method is lora"],
        id="mergeAdapter-with-full",
    ),
    pytest.param(
        trainjob(output={"dir": "hf://me/model"}),
        ["spec.output.dir", "cannot be an hf:// URI"],
        id="output-to-hf",
    ),
    pytest.param(
        trainjob(model="s3://Bucket_1/llama"),
        ["spec.model", "must be s3://<bucket>/<prefix> with a valid bucket name"],
        id="model-s3-bad-bucket",
    ),
    pytest.param(
        trainjob(dataset={"source": "s3://b/train.jsonl"}),
        ["spec.dataset.source", "with a valid bucket name"],
        id="dataset-s3-short-bucket",
    ),
    pytest.param(
        trainjob(checkpoint={"dir": "s3://-bucket/ckpt"}),
        ["spec.checkpoint.dir", "with a valid bucket name"],
        id="checkpoint-s3-bad-bucket",
    ),
    pytest.param(
        trainjob(output={"dir": "s3://"}),
        ["spec.output.dir", "with a valid bucket name"],
        id="output-s3-no-bucket",
    ),
    pytest.param(
        trainjob(procsPerNode=16, resourcesPerNode={"limits": {"nvidia.com/gpu": 8}}),
        ["spec.procsPerNode", "must not exceed the nvidia.com/gpu limit"],
        id="procs-over-gpus",
    ),
    pytest.param(
        trainjob(resourcesPerNode={"limits": {"nvidia.com/gpu": "eight"}}),
        ["spec.resourcesPerNode.limits", "eight"],
        id="gpu-quantity-garbage",
    ),
    pytest.param(trainjob(activeDeadlineSeconds=0), ["spec.activeDeadlineSeconds"], id="deadline-0"),
    pytest.param(trainjob(command=[]), ["spec.command", "at least 1 items"], id="empty-command"),
    pytest.param(trainjob(numNode=2), ['unknown field "spec.numNode"'], id="unknown-field-typo"),
    pytest.param(trainjob(name="Bad_Name"), ["metadata.name", "DNS-1035"], id="bad-name"),
    pytest.param(trainjob(name="a" * 60), ["metadata.name", "at most 56"], id="name-too-long"),
    pytest.param(
        isvc(autoscaling={"minReplicas": 5, "maxReplicas": 2}),
        ["spec.autoscaling.minReplicas", "minReplicas must not exceed maxReplicas"],
        id="isvc-min-over-max",
    ),
    pytest.param(
        isvc(autoscaling={"minReplicas": 1}),
        ["spec.autoscaling.maxReplicas", "Required value"],
        id="isvc-no-maxReplicas",
    ),
    pytest.param(
        isvc(autoscaling={"maxReplicas": 2, "metric": "latency"}),
        ["spec.autoscaling.metric", 'Unsupported value: "latency"'],
        id="isvc-unknown-metric",
    ),
    pytest.param(
        isvc(autoscaling={"maxReplicas": 2, "metric": "kvCache", "target": 80}),
        ["spec.autoscaling.target", "(0, 1]"],
        id="isvc-kvcache-target-percent",
    ),
    pytest.param(
        isvc(engine={"gpuMemoryUtilization": 1.5}),
        ["spec.engine.gpuMemoryUtilization"],
        id="isvc-gpu-memory-1.5",
    ),
    pytest.param(
        isvc(engine={"blockSize": 17}),
        ["spec.engine.blockSize", "Unsupported value: 17"],
        id="isvc-block-size-17",
    ),
    pytest.param(isvc(replicas=-1), ["spec.replicas"], id="isvc-negative-replicas"),
    pytest.param(
        isvc(engine={"kvCacheDtype": "fp8"}),
        ["spec.engine.kvCacheDtype", 'Unsupported value: "fp8"'],
        id="isvc-fp8-kv-cache",
    ),
    pytest.param(
        isvc(engine={"tensorParallelSize": 4}, resources={"limits": {"nvidia.com/gpu": 2}}),
        ["spec.engine.tensorParallelSize", "must not exceed the nvidia.com/gpu limit"],
        id="isvc-tp-over-gpus",
    ),
    pytest.param(
        isvc(engine={"tensorParallelSize": 0}), ["spec.engine.tensorParallelSize"], id="isvc-tp-zero"
    ),
    pytest.param(
        isvc(model={"source": "s3://UPPER/llama"}),
        ["spec.model.source", "with a valid bucket name"],
        id="isvc-model-s3-bad-bucket",
    ),
    pytest.param(
        quantizejob(method="w3a16"), ["spec.method", 'Unsupported value: "w3a16"'], id="qj-unknown-method"
    ),
    pytest.param(
        quantizejob(method="w4a16-rtn", groupSize=100),
        ["spec.groupSize", "groupSize must be 32, 64 or 128"],
        id="qj-group-size-100",
    ),
    pytest.param(
        quantizejob(method="w4a16-gptq"),
        ["spec.calibration", "calibration is required"],
        id="qj-gptq-without-calibration",
    ),
    pytest.param(
        quantizejob(method="fp8", groupSize=128),
        ["spec.groupSize", "may only be set for w8a16"],
        id="qj-fp8-group-size",
    ),
    pytest.param(
        quantizejob(method="w4a16-awq", calibration={"dataset": "/d.jsonl", "samples": 0}),
        ["spec.calibration.samples"],
        id="qj-zero-samples",
    ),
    pytest.param(
        quantizejob(method="w4a16-gptq", calibration={"dataset": "s3://bucket/c.jsonl"}),
        ["spec.calibration.dataset", "s3:// is not supported here"],
        id="qj-calibration-s3",
    ),
    pytest.param(
        quantizejob(method="w4a16-gptq", calibration={"dataset": "hf://me/calib"}),
        ["spec.calibration.dataset", "cannot be an hf:// URI"],
        id="qj-calibration-hf",
    ),
]


@pytest.mark.parametrize(("obj", "fragments"), REJECTED)
def test_bad_spec_is_rejected_naming_the_field(crds, obj: dict[str, Any], fragments: list[str]) -> None:
    result = apply(crds, obj)
    assert result.returncode != 0, f"accepted: {json.dumps(obj['spec'])}"
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_accepted(crds, path: Path) -> None:
    result = crds.kubectl("apply", "--dry-run=server", "-n", NAMESPACE, "-f", str(path), check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("gpus", [0, 4, 8], ids=["cpu-ranks", "one-per-rank", "spare"])
def test_tensor_parallel_within_the_gpu_limit_is_accepted(crds, gpus: int) -> None:
    obj = isvc(engine={"tensorParallelSize": 4}, resources={"limits": {"nvidia.com/gpu": gpus}})
    result = apply(crds, obj)
    assert result.returncode == 0, result.stderr


def test_hf_sources_are_accepted(crds) -> None:
    obj = trainjob(model="hf://meta-llama/Llama-3.2-1B", dataset={"source": "hf://me/chat-data"})
    result = apply(crds, obj)
    assert result.returncode == 0, result.stderr


def test_defaults_are_applied_by_the_api_server(crds) -> None:
    result = apply(crds, trainjob(name="defaults"), dry_run=True)
    assert result.returncode == 0, result.stderr
    out = crds.kubectl(
        "apply", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(trainjob(name="d"))
    )
    spec = json.loads(out.stdout)["spec"]
    assert (spec["method"], spec["backend"], spec["numNodes"], spec["suspend"]) == (
        "lora",
        "torchrun",
        1,
        False,
    )
    assert spec["failurePolicy"] == {"maxRestarts": 3, "backoffSeconds": 10, "forceDeleteAfterSeconds": 60}
    assert spec["hyperparameters"]["learningRate"] == 0.0001
    assert spec["checkpoint"] == {"everySteps": 500, "keepLast": 3, "resume": "auto"}


def test_gang_shape_changes_only_while_suspended(crds) -> None:
    obj = trainjob(name="immutable", numNodes=2, suspend=False)
    assert apply(crds, obj, dry_run=False).returncode == 0
    try:
        resize = json.dumps({"spec": {"numNodes": 3}})
        result = crds.kubectl(
            "patch", "-n", NAMESPACE, "trainjob", "immutable", "--type=merge", "-p", resize, check=False
        )
        assert result.returncode != 0
        assert "numNodes can only be changed while the job is suspended" in result.stderr
        crds.kubectl(
            "patch",
            "-n",
            NAMESPACE,
            "trainjob",
            "immutable",
            "--type=merge",
            "-p",
            json.dumps({"spec": {"suspend": True}}),
        )
        crds.kubectl("patch", "-n", NAMESPACE, "trainjob", "immutable", "--type=merge", "-p", resize)
        assert crds.kubectl_json("get", "-n", NAMESPACE, "trainjob", "immutable")["spec"]["numNodes"] == 3
    finally:
        crds.kubectl("delete", "-n", NAMESPACE, "trainjob", "immutable", "--wait=false", check=False)


def test_category_and_short_names(crds) -> None:
    resources = crds.kubectl("api-resources", "--api-group=lmforge.dev", "-o", "wide").stdout
    for short in ("lmtj", "lmisvc", "lmqj"):
        assert short in resources
    assert crds.kubectl("get", "lmforge", "-n", NAMESPACE, check=False).returncode == 0


# --- multi-LoRA (issue #22): spec.adapters, engine.lora, TrainJob serveAfter -----------------------

LORA = {"lora": {"maxLoras": 2, "adapterRoots": ["pvc://tuned"]}}
LORA_REJECTED = [
    pytest.param(
        isvc(
            engine=LORA,
            adapters=[{"name": "a", "source": "pvc://tuned/a"}, {"name": "a", "fromTrainJob": "t"}],
        ),
        ["spec.adapters[1]", "Duplicate value"],
        id="adapter-name-twice",
    ),
    pytest.param(
        isvc(engine=LORA, adapters=[{"name": "a"}]),
        ["spec.adapters[0].source", "exactly one of source or fromTrainJob"],
        id="adapter-without-source",
    ),
    pytest.param(
        isvc(engine=LORA, adapters=[{"name": "a", "source": "pvc://tuned/a", "fromTrainJob": "t"}]),
        ["spec.adapters[0].source", "exactly one of source or fromTrainJob"],
        id="adapter-with-both",
    ),
    pytest.param(
        isvc(adapters=[{"name": "a", "source": "pvc://tuned/a"}]),
        ["spec.adapters", "adapters needs engine.lora"],
        id="adapters-without-engine-lora",
    ),
    pytest.param(
        isvc(engine=LORA, apiKeySecret={"name": "k", "key": "key"}),
        ["spec.engine.lora", "cannot be combined with apiKeySecret"],
        id="lora-with-api-key",
    ),
    pytest.param(
        isvc(engine={**LORA, "tensorParallelSize": 2}, resources={"limits": {"nvidia.com/gpu": 2}}),
        ["spec.engine.lora", "cannot be combined with engine.tensorParallelSize > 1"],
        id="lora-with-tensor-parallel",
    ),
    pytest.param(
        trainjob(method="full", serveAfter={"inferenceService": "svc"}),
        ["spec.serveAfter", "may only be set when method is lora"],
        id="serve-after-full-fine-tune",
    ),
    pytest.param(
        trainjob(output={"dir": "pvc://out/a", "mergeAdapter": True}, serveAfter={"inferenceService": "svc"}),
        ["spec.serveAfter", "cannot be combined with output.mergeAdapter"],
        id="serve-after-merge-adapter",
    ),
]


@pytest.mark.parametrize(("obj", "fragments"), LORA_REJECTED)
def test_bad_lora_specs_are_rejected_naming_the_field(
    crds, obj: dict[str, Any], fragments: list[str]
) -> None:
    result = apply(crds, obj)
    assert result.returncode != 0, f"accepted: {json.dumps(obj['spec'])}"
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_lora_specs_are_accepted(crds) -> None:
    adapters = [{"name": "sql", "source": "pvc://tuned/sql"}, {"name": "support", "fromTrainJob": "tj"}]
    assert apply(crds, isvc(engine=LORA, adapters=adapters)).returncode == 0
    result = apply(crds, trainjob(serveAfter={"inferenceService": "svc", "adapterName": "support"}))
    assert result.returncode == 0, result.stderr
