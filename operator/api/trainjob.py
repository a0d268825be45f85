"""TrainJob: fine-tune a model (full or LoRA) on a gang of worker pods, one per node.

kubectl apply -f examples/trainjob.yaml
kubectl get lmtj            # PHASE NODES PROGRESS LOSS ETA RESTARTS AGE
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
    sub,
)

ExitCode = Annotated[int, Field(ge=1, le=255)]
ShortName = Annotated[str, Field(min_length=1, max_length=253)]


class Dataset(ApiModel):
    """Training data: JSON Lines, one example per line."""

    source: Annotated[str, local_uri("dataset.source")]
    """Where the .jsonl file (or a directory of them) lives: pvc://, hostPath://, an absolute path or hf://org/name (a dataset repo: its *.jsonl files are downloaded by the worker, see README) or s3://bucket/prefix (a .jsonl object or a prefix of them)."""
    format: Literal["text", "messages"] = "messages"
    """`text`: {"text": ...} per line (causal LM). `messages`: {"messages": [{"role", "content"}, ...]} per line, rendered with the model's chat template; loss on assistant turns only."""
    max_samples: int | None = Field(None, ge=1)
    """Use at most this many examples (default: all)."""


class LoRA(ApiModel):
    """Low-rank adapter settings (method: lora)."""

    r: int = Field(16, ge=1, le=1024)
    """Adapter rank."""
    alpha: int = Field(32, ge=1, le=4096)
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the adapter input."""
    target_modules: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1, max_length=64
    )
    """Names of the Linear modules that get adapters."""


class Hyperparameters(ApiModel):
    """Optimisation settings. Set `epochs` or `maxSteps` (neither: one epoch)."""

    __rules__ = (
        Rule(
            cel="!(has(self.epochs) && has(self.maxSteps))",
            message="set either epochs or maxSteps, not both",
            check=lambda h: h.epochs is None or h.max_steps is None,
            field_path=".maxSteps",
            reason="FieldValueForbidden",
        ),
        Rule(
            cel="!has(self.maxSteps) || self.warmupSteps < self.maxSteps",
            message="warmupSteps must be less than maxSteps",
            check=lambda h: h.max_steps is None or h.warmup_steps < h.max_steps,
            field_path=".warmupSteps",
        ),
    )

    learning_rate: float = Field(1e-4, gt=0, le=1)
    """Peak learning rate (AdamW)."""
    epochs: int | None = Field(None, ge=1, le=10000)
    """Passes over the dataset."""
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps to run (overrides the dataset length)."""
    batch_size: int = Field(1, ge=1, le=4096)
    """Sequences per device per micro-step."""
    seq_len: int = Field(2048, ge=16, le=1048576)
    """Tokens per sequence (longer examples are truncated)."""
    gradient_accumulation_steps: int = Field(1, ge=1, le=4096)
    """Micro-steps per optimizer step."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up steps."""
    weight_decay: float = Field(0.0, ge=0, le=1)
    """AdamW weight decay."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate schedule after warm-up."""
    max_grad_norm: float = Field(1.0, ge=0)
    """Gradient clipping norm (0: off)."""
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Training precision."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    seed: int = Field(42, ge=0)
    """Random seed (data order, adapter init)."""
    log_every_steps: int = Field(10, ge=1)
    """How often the worker reports progress (pod annotation lmforge.dev/progress)."""


class Checkpoint(ApiModel):
    """Periodic checkpoints; with `resume: auto` a restarted or resumed gang continues from the newest."""

    __rules__ = (
        Rule(
            cel="!has(self.dir) || !self.dir.startsWith('hf://')",
            message="checkpoint.dir cannot be an hf:// URI: checkpoints go to pvc://, hostPath://, s3:// or a path",
            check=lambda c: c.dir is None or not c.dir.startswith("hf://"),
            field_path=".dir",
        ),
    )

    dir: Annotated[str, local_uri("checkpoint.dir")] | None = None
    """Where checkpoints go; must be shared by all nodes (a volume, or s3://bucket/prefix: each checkpoint is uploaded with its manifest last). Default: <output.dir>/checkpoints."""
    every_steps: int = Field(500, ge=1)
    """Save every this many optimizer steps (and on SIGTERM)."""
    keep_last: int = Field(3, ge=1, le=1000)
    """Older checkpoints are deleted."""
    resume: Literal["auto", "never"] = "auto"
    """auto: continue from the newest checkpoint in `dir` if there is one."""


class Output(ApiModel):
    """Where the result goes: an HF checkpoint (full) or a PEFT adapter directory (lora)."""

    __rules__ = (
        Rule(
            cel="!self.dir.startsWith('hf://')",
            message="output.dir cannot be an hf:// URI: outputs go to pvc://, hostPath://, s3:// or a path",
            check=lambda o: not o.dir.startswith("hf://"),
            field_path=".dir",
        ),
    )

    dir: Annotated[str, local_uri("output.dir")]
    """Output directory: pvc://, hostPath://, a path or s3://bucket/prefix (uploaded when training ends, its manifest last)."""
    merge_adapter: bool = False
    """lora only: also write the base model with the adapter merged in (<dir>/merged)."""


class ServeAfter(ApiModel):
    """Serve the trained adapter on a running InferenceService once the job Succeeded (method: lora):
    that InferenceService loads <output.dir> into every ready replica as `adapterName`, no restart.
    The LoRA twin of QuantizeJob's serveAfter (which creates an InferenceService instead)."""

    inference_service: Annotated[
        str, Field(min_length=1, max_length=50, pattern=r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    ]
    """Name of the InferenceService (same namespace, with engine.lora) to serve the adapter on."""
    adapter_name: (
        Annotated[
            str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
        ]
        | None
    ) = None
    """The adapter's model id in the OpenAI API (default: the TrainJob's name)."""


class FailurePolicy(ApiModel):
    """What a worker failure does. The root cause is the earliest pod to fail (its peers usually die
    of NCCL timeouts after it). Exit codes 1-127 are application errors (the job fails); 128+ are
    signals (137 OOMKilled / SIGKILL, 143 SIGTERM) and pods that vanished or were evicted, which
    restart the whole gang after a backoff, up to `maxRestarts` times. The lists override the ranges."""

    __rules__ = (
        Rule(
            cel="!has(self.restartOnExitCodes) || !has(self.failOnExitCodes) || "
            "!self.restartOnExitCodes.exists(c, c in self.failOnExitCodes)",
            message="an exit code cannot be in both restartOnExitCodes and failOnExitCodes",
            check=lambda f: not set(f.restart_on_exit_codes or ()) & set(f.fail_on_exit_codes or ()),
            field_path=".failOnExitCodes",
        ),
    )

    max_restarts: int = Field(3, ge=0, le=1000)
    """Gang restarts before the job is Failed (0: never restart)."""
    restart_on_exit_codes: list[ExitCode] | None = Field(
        None, max_length=64, json_schema_extra={"x-kubernetes-list-type": "set"}
    )
    """Exit codes that restart the gang even though they are below 128 (e.g. a known flaky NCCL exit)."""
    fail_on_exit_codes: list[ExitCode] | None = Field(
        None, max_length=64, json_schema_extra={"x-kubernetes-list-type": "set"}
    )
    """Exit codes that fail the job even though they are 128 or above."""
    backoff_seconds: int = Field(10, ge=0, le=3600)
    """Wait before recreating the gang; doubles per restart, capped at 10 minutes."""
    force_delete_after_seconds: int = Field(60, ge=0, le=86400)
    """A pod still Terminating this long after its grace period (lost node) is force-deleted, so a restart never waits forever."""


class EnvVar(ApiModel):
    """An environment variable of the worker container (as in a pod spec)."""

    name: str = Field(min_length=1, max_length=256)
    """Variable name."""
    value: str | None = None
    """Literal value."""
    value_from: PassThrough | None = None
    """secretKeyRef / configMapKeyRef / fieldRef / resourceFieldRef, as in a pod spec."""


# Optional spec fields a gang is built from (see GANG rules below; the required ones are listed there).
GANG_OPTIONAL_FIELDS = (
    "lora",
    "zeroStage",
    "procsPerNode",
    "resourcesPerNode",
    "image",
    "command",
    "hyperparameters",
    "checkpoint",
    "schedulerName",
    "priorityClassName",
    "queueName",
    "nodeSelector",
    "tolerations",
    "env",
    "volumes",
    "volumeMounts",
)


class TrainJobSpec(ApiModel):
    """Desired state of a TrainJob. Only suspend, failurePolicy, activeDeadlineSeconds and ttlSecondsAfterFinished change a running job; every other field can only change while the job is suspended (the next gang uses it)."""

    __rules__ = (
        Rule(
            cel="!has(self.lora) || self.method == 'lora'",
            message="lora may only be set when method is lora",
            check=lambda s: s.lora is None or s.method == "lora",
            field_path=".lora",
            reason="FieldValueForbidden",
        ),
        Rule(
            cel="!has(self.zeroStage) || self.backend == 'deepspeed'",
            message="zeroStage may only be set when backend is deepspeed",
            check=lambda s: s.zero_stage is None or s.backend == "deepspeed",
            field_path=".zeroStage",
            reason="FieldValueForbidden",
        ),
        Rule(
            cel="!self.output.mergeAdapter || self.method == 'lora'",
            message="output.mergeAdapter may only be true when method is lora",
            check=lambda s: not s.output.merge_adapter or s.method == "lora",
            field_path=".output.mergeAdapter",
            reason="FieldValueForbidden",
        ),
        Rule(
            cel="!has(self.serveAfter) || self.method == 'lora'",
            message="serveAfter may only be set when method is lora (it serves the adapter on an InferenceService)",
            check=lambda s: s.serve_after is None or s.method == "lora",
            field_path=".serveAfter",
            reason="FieldValueForbidden",
        ),
        Rule(
            cel="!has(self.serveAfter) || !self.output.mergeAdapter",
            message="serveAfter cannot be combined with output.mergeAdapter: it serves the adapter directory, "
            "not a merged model",
            check=lambda s: s.serve_after is None or not s.output.merge_adapter,
            field_path=".serveAfter",
            reason="FieldValueForbidden",
        ),
        Rule(
            cel="!has(self.procsPerNode) || !has(self.resourcesPerNode) || !has(self.resourcesPerNode.limits) || "
            "!('nvidia.com/gpu' in self.resourcesPerNode.limits) || "
            "self.procsPerNode <= int(string(self.resourcesPerNode.limits['nvidia.com/gpu']))",
            message="procsPerNode must not exceed the nvidia.com/gpu limit in resourcesPerNode",
            check=lambda s: (
                s.procs_per_node is None
                or s.resources_per_node is None
                or s.resources_per_node.gpus() == 0
                or s.procs_per_node <= s.resources_per_node.gpus()
            ),
            field_path=".procsPerNode",
        ),
        # Transition rules (API server only): everything a gang is built from (its pods and
        # train.json) is fixed unless the job was suspended; the next gang reads the new values.
        *(
            Rule(
                cel=f"oldSelf.suspend || self.{f} == oldSelf.{f}",
                message=f"{f} can only be changed while the job is suspended (suspend it, edit, resume)",
                check=None,
                field_path=f".{f}",
            )
            for f in ("numNodes", "method", "backend", "model", "dataset", "output")
        ),
        *(
            Rule(
                cel=f"oldSelf.suspend || (has(self.{f}) == has(oldSelf.{f}) && (!has(self.{f}) || self.{f} == oldSelf.{f}))",
                message=f"{f} can only be changed while the job is suspended (suspend it, edit, resume)",
                check=None,
                field_path=f".{f}",
            )
            for f in GANG_OPTIONAL_FIELDS
        ),
    )

    model: Annotated[str, local_uri("model")]
    """Base model (HF layout): pvc://claim/path, hostPath:///abs/path, /abs/path, hf://org/name or s3://bucket/prefix (downloaded by the worker, see README)."""
    dataset: Dataset
    """Training data."""
    method: Literal["full", "lora"] = "lora"
    """full: update every weight. lora: train a low-rank adapter (see `lora`)."""
    lora: LoRA | None = None
    """Adapter settings (method: lora; defaults apply when omitted)."""
    backend: Literal["torchrun", "deepspeed"] = "torchrun"
    """Launcher: torchrun (PyTorch DDP/FSDP) or the DeepSpeed launcher (ZeRO)."""
    zero_stage: int | None = Field(None, ge=1, le=3)
    """DeepSpeed ZeRO stage (backend: deepspeed; default 2)."""
    num_nodes: int = Field(1, ge=1, le=1024)
    """Worker pods, one per node."""
    procs_per_node: int | None = Field(None, ge=1, le=64)
    """Processes per pod (default: the nvidia.com/gpu limit, or 1 without GPUs)."""
    resources_per_node: ResourceRequirements | None = None
    """Resources of each worker pod, e.g. limits: {nvidia.com/gpu: 8}."""
    image: str | None = Field(None, min_length=1, max_length=512)
    """Worker image (default: the operator's runtime image)."""
    command: list[Annotated[str, Field(max_length=4096)]] | None = Field(None, min_length=1, max_length=256)
    """Bring your own script: replaces the launcher command. The PET_*/MASTER_* env and /etc/lmforge/train.json are still provided."""
    hyperparameters: Hyperparameters = sub(Hyperparameters)
    """Optimisation settings."""
    checkpoint: Checkpoint = sub(Checkpoint)
    """Checkpointing and resume."""
    output: Output
    """Where the trained model or adapter goes."""
    suspend: bool = False
    """true: delete the worker pods and keep the job (phase Suspended); false again: recreate them, resuming from the last checkpoint."""
    failure_policy: FailurePolicy = sub(FailurePolicy)
    """Gang restarts and exit-code classification."""
    active_deadline_seconds: int | None = Field(None, ge=1)
    """Fail the job (reason DeadlineExceeded) if it runs longer than this, counted from the (last) start."""
    ttl_seconds_after_finished: int | None = Field(None, ge=0)
    """Delete the job and its pods this long after it Succeeded or Failed."""
    serve_after: ServeAfter | None = None
    """method: lora: once Succeeded, the adapter is served on this running InferenceService (no restart)."""
    scheduler_name: str | None = Field(None, min_length=1, max_length=253)
    """Pod schedulerName (e.g. a gang scheduler)."""
    priority_class_name: str | None = Field(None, min_length=1, max_length=253)
    """Pod priorityClassName."""
    queue_name: str | None = Field(None, min_length=1, max_length=63)
    """Kueue LocalQueue: pods get kueue.x-k8s.io/queue-name and one pod group per gang."""
    node_selector: dict[str, ShortName] | None = None
    """Pod nodeSelector."""
    tolerations: list[PassThrough] | None = None
    """Pod tolerations (passed through)."""
    env: list[EnvVar] | None = Field(None, max_length=256)
    """Extra environment of the worker container; overrides the operator's variables of the same name."""
    volumes: list[PassThrough] | None = None
    """Extra pod volumes (passed through), e.g. the PVC holding the model."""
    volume_mounts: list[PassThrough] | None = None
    """Extra mounts of the worker container (passed through)."""

    def effective_procs_per_node(self) -> int:
        if self.procs_per_node is not None:
            return self.procs_per_node
        gpus = self.resources_per_node.gpus() if self.resources_per_node else 0
        return max(gpus, 1)


# --- status --------------------------------------------------------------------------------------

TrainJobPhase = Literal["Pending", "Running", "Restarting", "Succeeded", "Failed", "Suspended"]


class ReplicaCounts(StatusModel):
    """Worker pods of the current attempt by state."""

    active: int = 0
    """Pending or Running and not being deleted."""
    succeeded: int = 0
    """Exited 0."""
    failed: int = 0
    """Exited non-zero or were lost."""


class Progress(StatusModel):
    """Training progress reported by rank 0 (its pod annotation lmforge.dev/progress)."""

    step: int | None = None
    """Optimizer steps done."""
    total_steps: int | None = None
    """Optimizer steps planned."""
    summary: str | None = None
    """"step/totalSteps" for the PROGRESS column."""
    epoch: float | None = None
    """Fractional epoch."""
    loss: float | None = None
    """Training loss (running mean over the last log interval)."""
    tokens_per_second: float | None = None
    """Training throughput over all ranks."""
    eta_seconds: int | None = None
    """Estimated seconds to the end."""
    eta: str | None = None
    """The same as a duration (e.g. 1h2m), for the ETA column."""
    last_checkpoint: str | None = None
    """Path of the newest checkpoint."""
    update_time: Timestamp | None = None
    """When the operator last folded a report in."""


class TrainJobStatus(StatusModel):
    """Observed state of a TrainJob, written only by the operator."""

    phase: TrainJobPhase | None = None
    """Pending -> Running -> (Restarting -> Running)* -> Succeeded | Failed; Suspended while spec.suspend. Succeeded and Failed never change."""
    conditions: list[Condition] = Field(
        [], json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}
    )
    """Created, Running, Restarting, Suspended, Succeeded, Failed."""
    observed_generation: int | None = None
    """metadata.generation this status reflects."""
    replicas: ReplicaCounts | None = None
    """Pods of the current attempt by state."""
    restarts: int = 0
    """Gang restarts so far (also the current attempt index, label lmforge.dev/restart)."""
    start_time: Timestamp | None = None
    """When the current run (first start or last resume) created its gang; activeDeadlineSeconds counts from here."""
    completion_time: Timestamp | None = None
    """When the job Succeeded or Failed."""
    last_restart_time: Timestamp | None = None
    """When the last gang restart was decided (the backoff counts from here)."""
    last_failure: LastFailure | None = None
    """The failure that caused the last restart or the job's failure."""
    progress: Progress | None = None
    """Latest progress report of rank 0."""


# --- the contract with the worker ----------------------------------------------------------------


class TrainConfig(ApiModel):
    """/etc/lmforge/train.json: what `lmforge.runtime.train` reads (built by the operator from the spec)."""

    job_name: str
    model: str
    dataset: Dataset
    method: Literal["full", "lora"]
    lora: LoRA | None = None
    backend: Literal["torchrun", "deepspeed"]
    zero_stage: int | None = None
    num_nodes: int
    procs_per_node: int
    hyperparameters: Hyperparameters
    checkpoint: Checkpoint
    output: Output


CRD = CrdInfo(
    kind="TrainJob",
    plural="trainjobs",
    short_names=("lmtj",),
    spec=TrainJobSpec,
    status=TrainJobStatus,
    description="Fine-tune an LLM (full or LoRA) on a gang of worker pods under torchrun or DeepSpeed.",
    root_rules=(name_rule(56, "it names the headless Service and the pods <name>-<rank>"),),
    printer_columns=(
        PrinterColumn(
            "Phase",
            ".status.phase",
            description="Pending, Running, Restarting, Succeeded, Failed or Suspended",
        ),
        PrinterColumn("Nodes", ".spec.numNodes", "integer", "Worker pods"),
        PrinterColumn("Progress", ".status.progress.summary", description="step/totalSteps"),
        PrinterColumn("Loss", ".status.progress.loss", "number", "Training loss"),
        PrinterColumn("ETA", ".status.progress.eta", description="Estimated time to finish"),
        PrinterColumn("Restarts", ".status.restarts", "integer", "Gang restarts"),
        PrinterColumn("Age", ".metadata.creationTimestamp", "date"),
        PrinterColumn("Method", ".spec.method", priority=1),
        PrinterColumn("Backend", ".spec.backend", priority=1),
    ),
)
