"""Spec models: defaults, and every Rule's Python half rejecting what its CEL half rejects."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from lmforge.devcluster.factories import spec_dict
from lmforge.operator.api import InferenceServiceSpec, QuantizeJobSpec, TrainJobSpec


def isvc(**overrides: Any) -> dict[str, Any]:
    return {"model": {"source": "hf://meta-llama/Llama-3.2-1B-Instruct"}, **overrides}


def qj(**overrides: Any) -> dict[str, Any]:
    return {
        "model": "pvc://models/llama",
        "method": "w8a16",
        "output": "pvc://models/llama-w8a16",
        **overrides,
    }


def test_trainjob_defaults() -> None:
    spec = TrainJobSpec.model_validate(spec_dict())
    assert (spec.method, spec.backend, spec.num_nodes, spec.effective_procs_per_node()) == (
        "lora",
        "torchrun",
        1,
        1,
    )
    assert (spec.failure_policy.max_restarts, spec.failure_policy.backoff_seconds) == (3, 10)
    assert (spec.checkpoint.every_steps, spec.checkpoint.resume, spec.hyperparameters.lr_scheduler) == (
        500,
        "auto",
        "cosine",
    )
    assert spec.to_k8s()["failurePolicy"] == {
        "maxRestarts": 3,
        "backoffSeconds": 10,
        "forceDeleteAfterSeconds": 60,
    }


@pytest.mark.parametrize(
    "uri",
    [
        "pvc://models/llama",
        "pvc://models",
        "hostPath:///data/llama",
        "/data/llama",
        "hf://meta-llama/Llama-3.2-1B",
        "hf://meta-llama/Llama-3.2-1B@main",
        "s3://models/llama/v1",
        "s3://my.bucket-1",
    ],
)
def test_model_uri_schemes_accepted(uri: str) -> None:
    assert TrainJobSpec.model_validate(spec_dict(model=uri)).model == uri


def test_s3_locations_accepted_for_every_kind() -> None:
    """What the issue lists: TrainJob model/dataset/output/checkpoint, QuantizeJob model/output,
    InferenceService model (the calibration set stays local, see INVALID)."""
    tj = TrainJobSpec.model_validate(
        spec_dict(
            model="s3://b-1/m", dataset={"source": "s3://b-1/d.jsonl"}, output={"dir": "s3://b-1/out"},
            checkpoint={"dir": "s3://b-1/ckpt"},
        )
    )  # fmt: skip
    assert (tj.model, tj.dataset.source, tj.output.dir, tj.checkpoint.dir) == (
        "s3://b-1/m", "s3://b-1/d.jsonl", "s3://b-1/out", "s3://b-1/ckpt",
    )  # fmt: skip
    qj = QuantizeJobSpec.model_validate({"model": "s3://b-1/m", "method": "w8a16", "output": "s3://b-1/q"})
    assert (qj.model, qj.output) == ("s3://b-1/m", "s3://b-1/q")
    assert (
        InferenceServiceSpec.model_validate({"model": {"source": "s3://b-1/q"}}).model.source == "s3://b-1/q"
    )


INVALID = [
    # (model, spec, message fragment)
    pytest.param(TrainJobSpec, spec_dict(numNodes=0), "greater than or equal to 1", id="tj-numNodes-0"),
    pytest.param(
        TrainJobSpec,
        spec_dict(method="full", lora={"r": 8}),
        "lora may only be set when method is lora",
        id="tj-lora-with-full",
    ),
    pytest.param(
        TrainJobSpec,
        spec_dict(zeroStage=2),
        "zeroStage may only be set when backend is deepspeed",
        id="tj-zero-with-torchrun",
    ),
    pytest.param(TrainJobSpec, spec_dict(method="qlora"), "'full' or 'lora'", id="tj-unknown-method"),
    pytest.param(
        TrainJobSpec,
        spec_dict(checkpoint={"everySteps": -5}),
        "greater than or equal to 1",
        id="tj-negative-everySteps",
    ),
    pytest.param(TrainJobSpec, spec_dict(model="ftp://x/y"), "must be pvc://", id="tj-bad-model-scheme"),
    pytest.param(TrainJobSpec, spec_dict(model="models/llama"), "must be pvc://", id="tj-relative-path"),
    pytest.param(
        TrainJobSpec,
        spec_dict(hyperparameters={"epochs": 1, "maxSteps": 10}),
        "either epochs or maxSteps",
        id="tj-epochs-and-maxSteps",
    ),
    pytest.param(
        TrainJobSpec,
        spec_dict(failurePolicy={"restartOnExitCodes": [1], "failOnExitCodes": [1]}),
        "both restartOnExitCodes and failOnExitCodes",
        id="tj-exit-code-in-both-lists",
    ),
    pytest.param(
        TrainJobSpec,
        spec_dict(method="full", output={"dir": "/out", "mergeAdapter": True}),
        "mergeAdapter may only be true",
        id="tj-merge-adapter-full",
    ),
    pytest.param(
        TrainJobSpec,
        spec_dict(output={"dir": "hf://me/out"}),
        "output.dir cannot be an hf://",
        id="tj-output-hf",
    ),
    pytest.param(
        TrainJobSpec,
        spec_dict(model="s3://Bucket_1/llama"),
        "must be s3://<bucket>/<prefix> with a valid bucket name",
        id="tj-model-s3-bad-bucket",
    ),
    pytest.param(
        TrainJobSpec,
        spec_dict(dataset={"source": "s3://b/train.jsonl"}),
        "must be s3://<bucket>/<prefix> with a valid bucket name",
        id="tj-dataset-s3-short-bucket",
    ),
    pytest.param(
        TrainJobSpec,
        spec_dict(checkpoint={"dir": "s3://-bucket/ckpt"}),
        "must be s3://<bucket>/<prefix> with a valid bucket name",
        id="tj-checkpoint-s3-bad-bucket",
    ),
    pytest.param(
        TrainJobSpec,
        spec_dict(output={"dir": "s3://"}),
        "must be s3://<bucket>/<prefix> with a valid bucket name",
        id="tj-output-s3-no-bucket",
    ),
    pytest.param(
        TrainJobSpec,
        spec_dict(procsPerNode=16, resourcesPerNode={"limits": {"nvidia.com/gpu": 8}}),
        "procsPerNode must not exceed",
        id="tj-procs-over-gpus",
    ),
    pytest.param(
        TrainJobSpec,
        spec_dict(resourcesPerNode={"limits": {"nvidia.com/gpu": "eight"}}),
        "not a Kubernetes quantity",
        id="tj-bad-quantity",
    ),
    pytest.param(TrainJobSpec, spec_dict(numNode=2), "Extra inputs are not permitted", id="tj-unknown-field"),
    pytest.param(
        InferenceServiceSpec,
        isvc(autoscaling={"minReplicas": 5, "maxReplicas": 2}),
        "minReplicas must not exceed maxReplicas",
        id="isvc-min-over-max",
    ),
    pytest.param(
        InferenceServiceSpec,
        isvc(autoscaling={"maxReplicas": 2, "metric": "kvCache", "target": 2}),
        "target must be in (0, 1]",
        id="isvc-kv-target",
    ),
    pytest.param(
        InferenceServiceSpec,
        isvc(engine={"blockSize": 17}),
        "Input should be 8, 16 or 32",
        id="isvc-block-size",
    ),
    pytest.param(
        QuantizeJobSpec,
        qj(method="w4a16-rtn", groupSize=100),
        "groupSize must be 32, 64 or 128",
        id="qj-group-size",
    ),
    pytest.param(
        QuantizeJobSpec, qj(method="w4a16-gptq"), "calibration is required", id="qj-gptq-no-calibration"
    ),
    pytest.param(
        QuantizeJobSpec, qj(method="fp8", groupSize=128), "groupSize may only be set", id="qj-fp8-group"
    ),
    pytest.param(QuantizeJobSpec, qj(method="int3"), "Input should be", id="qj-unknown-method"),
    pytest.param(
        QuantizeJobSpec,
        qj(calibration={"dataset": "s3://bucket/c.jsonl"}),
        "calibration.dataset: s3:// is not supported here",
        id="qj-calibration-s3",
    ),
    pytest.param(
        QuantizeJobSpec,
        qj(calibration={"dataset": "hf://me/calib"}),
        "calibration.dataset cannot be an hf:// URI",
        id="qj-calibration-hf",
    ),
    pytest.param(
        InferenceServiceSpec,
        isvc(model={"source": "s3://UPPER/llama"}),
        "must be s3://<bucket>/<prefix> with a valid bucket name",
        id="isvc-model-s3-bad-bucket",
    ),
]


@pytest.mark.parametrize(("model", "spec", "message"), INVALID)
def test_invalid_specs_are_rejected(model, spec: dict[str, Any], message: str) -> None:
    with pytest.raises(
        ValidationError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")
    ):
        model.model_validate(spec)


def test_quantize_group_size_defaults() -> None:
    assert QuantizeJobSpec.model_validate(qj(method="w4a16-rtn")).effective_group_size() == 128
    assert QuantizeJobSpec.model_validate(qj()).effective_group_size() == -1


def test_inferenceservice_defaults() -> None:
    spec = InferenceServiceSpec.model_validate(isvc(autoscaling={"maxReplicas": 4}))
    assert (spec.replicas, spec.engine.block_size, spec.engine.gpu_memory_utilization) == (1, 16, 0.9)
    assert (
        spec.autoscaling.metric,
        spec.autoscaling.min_replicas,
        spec.autoscaling.scale_down_stabilization_seconds,
    ) == ("queue", 1, 300)
