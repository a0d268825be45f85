"""QuantizeJob: quantize a checkpoint in one pod (a Kubernetes Job) into compressed-tensors that HF
transformers and vLLM load; optionally serve the result right after.

    kubectl get lmqj            # PHASE METHOD SIZE AGE
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from lmforge.operator.api.base import (
    ApiModel,
    Condition,
    CrdInfo,
    LastFailure,
    PassThrough,
    PrinterColumn,
    ResourceRequirements,
    Rule,
    StatusModel,
    Timestamp,
    local_uri,
    name_rule,
)

QuantizeMethod = Literal["w8a16", "w4a16-rtn", "w4a16-gptq", "w4a16-awq", "fp8"]


class Calibration(ApiModel):
    """Calibration data for GPTQ/AWQ (and optional for the others' accuracy report)."""

    __rules__ = (
        Rule(
            cel="!self.dataset.startsWith('hf://')",
            message="calibration.dataset cannot be an hf:// URI: the quantizer reads a JSON Lines file from "
            "pvc://, hostPath:// or a path",
            check=lambda c: not c.dataset.startswith("hf://"),
            field_path=".dataset",
        ),
    )

    dataset: Annotated[str, local_uri("calibration.dataset", s3=False)]
    """JSON Lines with "text" or "messages" per line: pvc://, hostPath:// or an absolute path."""
    samples: int = Field(128, ge=1, le=65536)
    """Calibration sequences."""
    seq_len: int = Field(512, ge=16, le=131072)
    """Tokens per calibration sequence."""


class ServeAfter(ApiModel):
    """Create an InferenceService for the quantized model once the job succeeds."""

    name: Annotated[str, Field(min_length=1, max_length=50, pattern=r"^[a-z]([-a-z0-9]*[a-z0-9])?$")]
    """Name of the InferenceService to create (or update)."""
    replicas: int = Field(1, ge=0, le=1000)
    """Its replicas."""


# Every field the Job is built from: a Job's pod template is immutable, so these are too (a change
# would be acknowledged and never reach the pod). serveAfter is applied on every pass and may change.
JOB_FIELDS = (
    "model",
    "method",
    "groupSize",
    "calibration",
    "ignore",
    "output",
    "image",
    "resources",
    "activeDeadlineSeconds",
    "ttlSecondsAfterFinished",
    "nodeSelector",
    "tolerations",
    "env",
    "volumes",
    "volumeMounts",
)


class QuantizeJobSpec(ApiModel):
    """Desired state of a QuantizeJob. Only serveAfter can change after creation (the Job is immutable): create a new QuantizeJob to quantize differently."""

    __rules__ = (
        *(
            Rule(
                cel=f"has(self.{f}) == has(oldSelf.{f}) && (!has(self.{f}) || self.{f} == oldSelf.{f})",
                message=f"{f} cannot be changed once the QuantizeJob exists (its Job is immutable): "
                "create a new QuantizeJob",
                check=None,
                field_path=f".{f}",
            )
            for f in JOB_FIELDS
        ),
        Rule(
            cel="!has(self.groupSize) || self.method.startsWith('w')",
            message="groupSize may only be set for w8a16 and w4a16-* methods",
            check=lambda s: s.group_size is None or s.method.startswith("w"),
            field_path=".groupSize",
            reason="FieldValueForbidden",
        ),
        Rule(
            cel="!has(self.groupSize) || !self.method.startsWith('w4a16') || self.groupSize in [32, 64, 128]",
            message="groupSize must be 32, 64 or 128 for w4a16 methods",
            check=lambda s: (
                s.group_size is None or not s.method.startswith("w4a16") or s.group_size in (32, 64, 128)
            ),
            field_path=".groupSize",
        ),
        Rule(
            cel="!(self.method in ['w4a16-gptq', 'w4a16-awq']) || has(self.calibration)",
            message="calibration is required for w4a16-gptq and w4a16-awq",
            check=lambda s: s.method not in ("w4a16-gptq", "w4a16-awq") or s.calibration is not None,
            field_path=".calibration",
            reason="FieldValueRequired",
        ),
        Rule(
            cel="!self.output.startsWith('hf://')",
            message="output cannot be an hf:// URI: outputs go to pvc://, hostPath://, s3:// or a path",
            check=lambda s: not s.output.startswith("hf://"),
            field_path=".output",
        ),
    )

    model: Annotated[str, local_uri("model")]
    """HF-layout checkpoint to quantize: pvc://, hostPath://, an absolute path, hf://org/name or s3://bucket/prefix (downloaded in the pod)."""
    method: QuantizeMethod
    """w8a16: int8 weights per channel. w4a16-rtn/gptq/awq: int4 weights in groups (round-to-nearest, GPTQ, AWQ). fp8: float8 e4m3 weights and activations."""
    group_size: int | None = Field(None, ge=-1, le=4096)
    """Weights per scale (w4a16: 32, 64 or 128, default 128; w8a16: default per channel, -1)."""
    calibration: Calibration | None = None
    """Calibration data (required for gptq and awq)."""
    ignore: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(["lm_head"], max_length=256)
    """Module names (or re:<regex>) left unquantized."""
    output: Annotated[str, local_uri("output")]
    """Output directory (compressed-tensors checkpoint): pvc://, hostPath://, an absolute path or s3://bucket/prefix (uploaded when done, its manifest last)."""
    serve_after: ServeAfter | None = None
    """Serve the result when done."""
    image: str | None = Field(None, min_length=1, max_length=512)
    """Image (default: the operator's runtime image)."""
    resources: ResourceRequirements | None = None
    """Resources of the quantization pod."""
    active_deadline_seconds: int | None = Field(None, ge=1)
    """Fail if it runs longer than this."""
    ttl_seconds_after_finished: int | None = Field(None, ge=0)
    """Delete the job this long after it finished."""
    node_selector: dict[str, Annotated[str, Field(max_length=253)]] | None = None
    """Pod nodeSelector."""
    tolerations: list[PassThrough] | None = None
    """Pod tolerations (passed through)."""
    env: list[PassThrough] | None = None
    """Extra environment (passed through)."""
    volumes: list[PassThrough] | None = None
    """Extra pod volumes (passed through)."""
    volume_mounts: list[PassThrough] | None = None
    """Extra mounts (passed through)."""

    def effective_group_size(self) -> int:
        if self.group_size is not None:
            return self.group_size
        return 128 if self.method.startswith("w4a16") else -1


QuantizeJobPhase = Literal["Pending", "Running", "Succeeded", "Failed"]


class QuantizeResult(StatusModel):
    """What the quantization produced."""

    size_bytes_before: int | None = None
    """Checkpoint size before."""
    size_bytes_after: int | None = None
    """Checkpoint size after."""
    kl_divergence: float | None = None
    """Mean KL(original || quantized) of next-token distributions on held-out text."""
    top1_agreement: float | None = None
    """Fraction of positions where both models pick the same next token."""
    output_path: str | None = None
    """Where the quantized checkpoint was written."""


class QuantizeJobStatus(StatusModel):
    """Observed state of a QuantizeJob, written only by the operator."""

    phase: QuantizeJobPhase | None = None
    """Pending -> Running -> Succeeded | Failed (terminal)."""
    conditions: list[Condition] = Field(
        [], json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}
    )
    """Created, Running, Succeeded, Failed."""
    observed_generation: int | None = None
    """metadata.generation this status reflects."""
    start_time: Timestamp | None = None
    """When the pod was created."""
    completion_time: Timestamp | None = None
    """When the job finished."""
    size: str | None = None
    """Human-readable result for the SIZE column, e.g. "3.9GiB (from 13.5GiB)"."""
    result: QuantizeResult | None = None
    """Sizes, accuracy and output path."""
    last_failure: LastFailure | None = None
    """Why the pod failed."""
    inference_service: str | None = None
    """Name of the InferenceService created by serveAfter."""


CRD = CrdInfo(
    kind="QuantizeJob",
    plural="quantizejobs",
    short_names=("lmqj",),
    spec=QuantizeJobSpec,
    status=QuantizeJobStatus,
    description="Quantize an LLM checkpoint (W8A16, W4A16 RTN/GPTQ/AWQ, FP8) into compressed-tensors.",
    root_rules=(name_rule(56, "it names the Job"),),
    printer_columns=(
        PrinterColumn("Phase", ".status.phase", description="Pending, Running, Succeeded or Failed"),
        PrinterColumn("Method", ".spec.method", description="Quantization method"),
        PrinterColumn("Size", ".status.size", description="Size after (before)"),
        PrinterColumn("Age", ".metadata.creationTimestamp", "date"),
    ),
)
