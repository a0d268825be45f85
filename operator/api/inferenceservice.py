"""InferenceService: an OpenAI-compatible endpoint (Deployment + Service), autoscaled by the operator
on queue depth, KV-cache usage or running requests scraped from the pods' /metrics.

    kubectl get lmisvc          # PHASE READY REPLICAS URL AGE
    kubectl scale lmisvc chat --replicas 3   # the /scale subresource (also used by HPA/KEDA)
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from lmforge.operator.api.base import (
    ApiModel,
    Condition,
    CrdInfo,
    LastFailure,
    PassThrough,
    PrinterColumn,
    ResourceRequirements,
    Rule,
    ScaleSubresource,
    SecretKeyRef,
    StatusModel,
    Timestamp,
    local_uri,
    name_rule,
    sub,
)


class ModelSpec(ApiModel):
    """The checkpoint to serve and how to load it."""

    source: Annotated[str, local_uri("model.source")]
    """HF-layout checkpoint: pvc://, hostPath://, an absolute path, hf://org/name[@revision] or s3://bucket/prefix (remote ones are downloaded by the storage initializer, an init container, through the node model cache when the operator has one)."""
    served_name: str | None = Field(None, min_length=1, max_length=256)
    """Model id in the OpenAI API (default: the resource name)."""
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    """Activation/weight dtype (auto: from config.json)."""
    max_model_len: int | None = Field(None, ge=16, le=1048576)
    """Context length limit (default: the model's)."""
    quantization: Literal["w8a16", "w4a16", "fp8"] | None = None
    """Quantized weights (default: detected from the checkpoint's quantization_config)."""


class EngineSpec(ApiModel):
    """Continuous-batching engine settings (vLLM names)."""

    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """Fraction of GPU memory for weights + KV cache."""
    max_num_seqs: int = Field(256, ge=1, le=65536)
    """Sequences in one batch."""
    max_num_batched_tokens: int = Field(8192, ge=16, le=1048576)
    """Tokens in one forward pass (chunked prefill)."""
    block_size: Literal[8, 16, 32] = 16
    """Tokens per KV-cache block."""
    prefix_caching: bool = True
    """Reuse KV blocks of shared prompt prefixes."""
    kv_cache_dtype: Literal["auto", "int8"] = "auto"
    """KV-cache precision: auto (the model dtype) or int8 (per-token-head scales, ~2x the KV blocks of
    bf16). fp8 is not offered until the runtime implements it (rejected here rather than crash-looping)."""
    enforce_eager: bool = False
    """Run every step eagerly: no CUDA graphs for decode (they cost capture time and a little memory)."""
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    """GPUs one replica splits the model over (one process per rank in the pod, NCCL). The pod's
    nvidia.com/gpu limit defaults to it and must not be below it; a limit of 0 runs the ranks on CPU
    (gloo). The autoscaler counts replicas, each of tensorParallelSize GPUs."""
    lora: LoRAEngine | None = None
    """Serve LoRA adapters (spec.adapters) beside the base model (off when absent)."""


class LoRAEngine(ApiModel):
    """Multi-LoRA serving (the server's --enable-lora --allow-runtime-lora-updating). Part of the pod
    template: setting or changing it restarts the pods once; the adapter list never does."""

    max_loras: int = Field(4, ge=1, le=256)
    """Adapters resident on the GPU at once (--max-loras)."""
    max_lora_rank: int = Field(16, ge=1, le=512)
    """Largest adapter rank served (--max-lora-rank); a larger one is a load error on the adapter."""
    max_cpu_loras: int | None = Field(None, ge=1, le=4096)
    """Adapters cached in host memory, LRU (--max-cpu-loras; default: maxLoras)."""
    adapter_roots: list[Annotated[str, local_uri("engine.lora.adapterRoots")]] = Field([], max_length=16)
    """Volumes mounted read-only by every replica for adapters: pvc://<claim> or hostPath:///<dir>
    (e.g. where TrainJobs write their output). An adapter must sit under one of them, under the
    model's claim (pvc://) or under a spec.volumeMounts path: the operator loads adapters over HTTP into
    running pods, and a pod cannot mount a new volume without a restart."""


class Autoscaling(ApiModel):
    """Operator-driven autoscaling. `target` is per replica: waiting requests (queue), KV-cache usage
    in (0, 1] (kvCache) or running requests (running)."""

    __rules__ = (
        Rule(
            cel="self.minReplicas <= self.maxReplicas",
            message="minReplicas must not exceed maxReplicas",
            check=lambda a: a.min_replicas <= a.max_replicas,
            field_path=".minReplicas",
        ),
        Rule(
            cel="self.metric != 'kvCache' || self.target <= 1.0",
            message="target must be in (0, 1] when metric is kvCache (a fraction of the KV cache)",
            check=lambda a: a.metric != "kvCache" or a.target <= 1.0,
            field_path=".target",
        ),
    )

    min_replicas: int = Field(1, ge=0, le=1000)
    """Lower bound (0: scale to zero when idle)."""
    max_replicas: int = Field(ge=1, le=1000)
    """Upper bound."""
    metric: Literal["queue", "kvCache", "running"] = "queue"
    """Which engine signal drives scaling."""
    target: float = Field(4.0, gt=0)
    """Desired metric value per replica."""
    scale_up_stabilization_seconds: int = Field(0, ge=0, le=3600)
    """Scale up only to the lowest recommendation seen in this window."""
    scale_down_stabilization_seconds: int = Field(300, ge=0, le=3600)
    """Scale down only to the highest recommendation seen in this window."""
    max_scale_up_step: int = Field(4, ge=1, le=1000)
    """Replicas added per decision at most."""
    max_scale_down_step: int = Field(1, ge=1, le=1000)
    """Replicas removed per decision at most."""


def _gpu_limit(resources: ResourceRequirements | None) -> int | None:
    """The container's nvidia.com/gpu limit; None when the spec does not set one."""
    if resources is None or not resources.limits or "nvidia.com/gpu" not in resources.limits:
        return None
    return int(resources.limits["nvidia.com/gpu"])


ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"


class Adapter(ApiModel):
    """A LoRA adapter served beside the base model; a request's `model` picks it by name."""

    __rules__ = (
        Rule(
            cel="has(self.source) != has(self.fromTrainJob)",
            message="exactly one of source or fromTrainJob must be set",
            check=lambda a: (a.source is None) != (a.from_train_job is None),
            field_path=".source",
        ),
    )

    name: str = Field(min_length=1, max_length=128, pattern=ADAPTER_NAME_PATTERN)
    """The adapter's model id in the OpenAI API."""
    source: Annotated[str, local_uri("adapters.source")] | None = None
    """PEFT adapter directory: pvc://<claim>/<path>, hostPath:///<dir> or /<dir>, on a volume the pods
    mount (see engine.lora.adapterRoots). hf:// is refused: the server loads adapters from local disk."""
    from_train_job: Annotated[str, Field(min_length=1, max_length=253)] | None = None
    """A TrainJob (method: lora) in this namespace: its output.dir, once it Succeeded."""


def _unique_adapter_names(adapters: list[Adapter]) -> list[Adapter]:
    """The API server enforces the same through the list-map key `name` (a Duplicate value error)."""
    names = [a.name for a in adapters]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"adapters: name {twice[0]!r} is used twice (adapter names must be unique)")
    return adapters


class InferenceServiceSpec(ApiModel):
    """Desired state of an InferenceService."""

    __rules__ = (
        Rule(
            cel="!has(self.resources) || !has(self.resources.limits) || "
            "!('nvidia.com/gpu' in self.resources.limits) || "
            "int(string(self.resources.limits['nvidia.com/gpu'])) == 0 || "
            "self.engine.tensorParallelSize <= int(string(self.resources.limits['nvidia.com/gpu']))",
            message="engine.tensorParallelSize must not exceed the nvidia.com/gpu limit in resources "
            "(0 GPUs: the ranks run on CPU)",
            check=lambda s: (
                _gpu_limit(s.resources) in (None, 0)
                or s.engine.tensor_parallel_size <= _gpu_limit(s.resources)
            ),
            field_path=".engine.tensorParallelSize",
        ),
        Rule(
            cel="size(self.adapters) == 0 || has(self.engine.lora)",
            message="adapters needs engine.lora (multi-LoRA serving is part of the pod template)",
            check=lambda s: not s.adapters or s.engine.lora is not None,
            field_path=".adapters",
        ),
        Rule(
            cel="!has(self.engine.lora) || !has(self.engine.tensorParallelSize) || "
            "self.engine.tensorParallelSize == 1",
            message="engine.lora cannot be combined with engine.tensorParallelSize > 1 yet (the engine does not "
            "shard adapters)",
            check=lambda s: s.engine.lora is None or s.engine.tensor_parallel_size == 1,
            field_path=".engine.lora",
        ),
        Rule(
            cel="!has(self.engine.lora) || !has(self.apiKeySecret)",
            message="engine.lora cannot be combined with apiKeySecret yet (the operator would need to read the Secret "
            "to load adapters)",
            check=lambda s: s.engine.lora is None or s.api_key_secret is None,
            field_path=".engine.lora",
        ),
    )

    model: ModelSpec
    """What to serve."""
    engine: EngineSpec = sub(EngineSpec)
    """Engine settings."""
    resources: ResourceRequirements | None = None
    """Resources of each replica, e.g. limits: {nvidia.com/gpu: 1}."""
    replicas: int = Field(1, ge=0, le=1000)
    """Replicas when autoscaling is off (the /scale subresource: `kubectl scale`). With autoscaling, a change
    sets the Deployment once (clamped to min/max) and the autoscaler takes over from there."""
    autoscaling: Autoscaling | None = None
    """Operator-driven autoscaling (off when absent)."""
    api_key_secret: SecretKeyRef | None = None
    """Require `Authorization: Bearer <key>` with the key from this Secret."""
    startup_timeout_seconds: int = Field(1800, ge=60, le=86400)
    """Time a replica may take to load the model before the kubelet restarts it (the startupProbe budget)."""
    graceful_shutdown_seconds: int = Field(60, ge=0, le=3600)
    """After SIGTERM, time in-flight requests get to finish (the pod's termination grace covers it)."""
    image: str | None = Field(None, min_length=1, max_length=512)
    """Server image (default: the operator's runtime image)."""
    node_selector: dict[str, Annotated[str, Field(max_length=253)]] | None = None
    """Pod nodeSelector."""
    tolerations: list[PassThrough] | None = None
    """Pod tolerations (passed through)."""
    env: list[PassThrough] | None = None
    """Extra environment of the server container (passed through)."""
    volumes: list[PassThrough] | None = None
    """Extra pod volumes (passed through)."""
    volume_mounts: list[PassThrough] | None = None
    """Extra mounts of the server container (passed through)."""
    adapters: Annotated[list[Adapter], AfterValidator(_unique_adapter_names)] = Field(
        [],
        max_length=256,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    """LoRA adapters loaded into every ready replica over HTTP: adding, removing or changing one never
    restarts a pod (needs engine.lora)."""


InferenceServicePhase = Literal["Pending", "Loading", "Ready", "Degraded", "ScaledToZero", "Failed"]


class AutoscalingStatus(StatusModel):
    """The autoscaler's last look."""

    desired_replicas: int | None = None
    """What the autoscaler wants now (before stabilization and step limits)."""
    current_metric_value: float | None = None
    """Observed metric per ready replica."""
    last_scale_time: Timestamp | None = None
    """When spec.replicas was last changed by the autoscaler."""
    last_decision: str | None = None
    """Why (e.g. "queue 9.5/replica > target 4: 2 -> 3")."""


class ParallelStatus(StatusModel):
    """The parallel layout of every replica."""

    tensor_parallel_size: int
    """Ranks (processes) per replica, one model shard each."""
    gpus_per_replica: int
    """nvidia.com/gpu of each replica's pod (0: the ranks run on CPU)."""
    layout: str
    """e.g. "2 replicas x TP=4 (8 GPUs)"."""


class ScaleEvent(StatusModel):
    """One autoscaling change."""

    time: Timestamp
    from_replicas: int
    to_replicas: int
    reason: str


class ModelFetchStatus(StatusModel):
    """What the storage initializers reported (pod annotation lmforge.dev/fetch) for a remote model."""

    source: str | None = None
    """The model URI (hf:// or s3://)."""
    revision: str | None = None
    """What the source resolved to: the hf:// commit, a digest of the s3:// objects' ETags."""
    cached: bool | None = None
    """Whether the newest replica started warm: its model came from the node model cache, no download."""
    cached_replicas: int | None = None
    """Replicas whose model came from the node cache."""
    downloading: int | None = None
    """Replicas whose storage initializer is still downloading."""
    bytes: int | None = None
    """Downloading: bytes fetched so far by the slowest replica; else the newest replica's download size."""
    total_bytes: int | None = None
    """Size of the model, when the source tells it (s3://)."""
    eta_seconds: int | None = None
    """Downloading: seconds left at the current rate (the slowest replica)."""


class AdapterStatus(StatusModel):
    """One desired adapter: where it is read from and which ready replicas serve it."""

    name: str
    path: str | None = None
    """The directory inside the pods (None while a fromTrainJob has no output yet)."""
    replicas: list[str] = []
    """Ready pods serving it from `path`."""
    last_error: str | None = None
    """The latest reason it is not served (a load's 400, a TrainJob not Succeeded yet)."""


class InferenceServiceStatus(StatusModel):
    """Observed state of an InferenceService, written only by the operator."""

    phase: InferenceServicePhase | None = None
    """Pending -> Loading -> Ready; Degraded when some replicas are not ready; ScaledToZero; Failed when pods crash-loop."""
    conditions: list[Condition] = Field(
        [], json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}
    )
    """Ready, Progressing, Degraded, ..."""
    observed_generation: int | None = None
    """metadata.generation this status reflects."""
    replicas: int | None = None
    """Pods that exist (the /scale subresource's status.replicas)."""
    ready_replicas: int | None = None
    """Pods passing /health."""
    url: str | None = None
    """In-cluster base URL of the OpenAI API (http://<name>.<namespace>.svc/v1)."""
    selector: str | None = None
    """Label selector of the pods (for the /scale subresource and HPA)."""
    last_failure: LastFailure | None = None
    """Latest pod failure."""
    autoscaling: AutoscalingStatus | None = None
    """Autoscaler state."""
    model: ModelFetchStatus | None = None
    """Remote models (hf://, s3://): download progress and whether replicas started from the node cache."""
    parallelism: ParallelStatus | None = None
    """How each replica splits the model (tensor parallel ranks and the GPUs they use)."""
    history: list[ScaleEvent] = Field([], max_length=20)
    """Most recent scaling changes, newest last (at most 20)."""
    adapters: list[AdapterStatus] = []
    """Per spec.adapters entry (and TrainJob serveAfter), the replicas serving it and the last error."""
    adapters_summary: str | None = None
    """Served/desired per adapter for `kubectl get -o wide`, e.g. "sql 2/2, chat 0/2"."""


CRD = CrdInfo(
    kind="InferenceService",
    plural="inferenceservices",
    short_names=("lmisvc",),
    spec=InferenceServiceSpec,
    status=InferenceServiceStatus,
    description="Serve an LLM behind an OpenAI-compatible API, autoscaled on engine metrics.",
    root_rules=(name_rule(50, "it names the Deployment and the Service"),),
    scale=ScaleSubresource(),
    printer_columns=(
        PrinterColumn(
            "Phase", ".status.phase", description="Pending, Loading, Ready, Degraded, ScaledToZero or Failed"
        ),
        PrinterColumn("Ready", ".status.readyReplicas", "integer", "Replicas passing /health"),
        PrinterColumn("Replicas", ".status.replicas", "integer", "Replicas that exist"),
        PrinterColumn("URL", ".status.url", description="OpenAI API base URL"),
        PrinterColumn("Age", ".metadata.creationTimestamp", "date"),
        PrinterColumn("Model", ".spec.model.source", priority=1),
        PrinterColumn(
            "Adapters", ".status.adaptersSummary", description="Replicas serving each adapter", priority=1
        ),
    ),
)
