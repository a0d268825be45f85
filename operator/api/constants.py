"""Names shared by the operator, the builders and the worker pods: labels, annotations,
condition types, phases, and the Reason/Message pairs the operator writes into conditions and
Events (JobSet style: a reason is CamelCase and stable, its message is for humans)."""

from __future__ import annotations

GROUP = "lmforge.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CATEGORY = "lmforge"

# --- labels and annotations on the objects the operator creates --------------------------------
LABEL_JOB_NAME = f"{GROUP}/job-name"
LABEL_RANK = f"{GROUP}/rank"
LABEL_RESTART = f"{GROUP}/restart"  # attempt index: 0 for the first gang, +1 per gang restart
LABEL_KIND = f"{GROUP}/kind"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "lmforge-operator"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
LABEL_KUEUE_POD_GROUP = "kueue.x-k8s.io/pod-group-name"
ANNOTATION_KUEUE_POD_GROUP_COUNT = "kueue.x-k8s.io/pod-group-total-count"

# JSON the worker writes onto its own pod: {"step", "totalSteps", "loss", "tokensPerSecond",
# "etaSeconds", "epoch", "lastCheckpoint"}; rank 0's copy is folded into TrainJob.status.progress.
ANNOTATION_PROGRESS = f"{GROUP}/progress"
# Local cluster (kwok) only: how a fake pod ends ("succeed" or "fail-<exit code>").
ANNOTATION_FATE = f"{GROUP}/fate"
# Hash of the spec fields a gang is built from (builders/trainjob.py `gang_spec_hash`): a running pod
# whose hash differs from the job's was built from an older spec and is replaced.
ANNOTATION_SPEC_HASH = f"{GROUP}/spec-hash"

# --- TrainJob ------------------------------------------------------------------------------------
MASTER_PORT = 29500
CONFIG_MOUNT_PATH = "/etc/lmforge"
CONFIG_FILE = "train.json"

# Condition types (CamelCase, JobSet/Kubernetes style).
ConditionCreated = "Created"
ConditionRunning = "Running"
ConditionRestarting = "Restarting"
ConditionSucceeded = "Succeeded"
ConditionFailed = "Failed"
ConditionSuspended = "Suspended"
ConditionReady = "Ready"

# Phases. Succeeded and Failed are terminal: once written they never change.
PhasePending = "Pending"
PhaseRunning = "Running"
PhaseRestarting = "Restarting"
PhaseSucceeded = "Succeeded"
PhaseFailed = "Failed"
PhaseSuspended = "Suspended"
TERMINAL_PHASES = frozenset({PhaseSucceeded, PhaseFailed})

# Reason / Message pairs. Messages with {placeholders} are formatted by the policy.
ReasonGangCreated = "GangCreated"
MessageGangCreated = "created {num_nodes} worker pods (attempt {attempt})"
ReasonWaitingForPods = "WaitingForPods"
MessageWaitingForPods = "{running}/{num_nodes} worker pods running"
ReasonAllWorkersRunning = "AllWorkersRunning"
MessageAllWorkersRunning = "all {num_nodes} worker pods are running"
ReasonAllWorkersSucceeded = "AllWorkersSucceeded"
MessageAllWorkersSucceeded = "rank 0 exited 0: training finished"
ReasonRetryableFailure = "RetryableFailure"
MessageRetryableFailure = (
    "pod {pod} failed ({detail}); restarting the gang, attempt {attempt} of {max_attempts}"
)
ReasonRestartBackoff = "RestartBackoff"
MessageRestartBackoff = "waiting {seconds}s before recreating the gang"
ReasonCreatingPods = "CreatingPods"
MessageCreatingPods = "creating {num_nodes} worker pods (attempt {attempt})"
ReasonPodCreationFailed = "PodCreationFailed"
MessagePodCreationFailed = "the API server refused worker pod {pod}: {error}"
ReasonServiceAccountMissing = "ServiceAccountMissing"
MessageServiceAccountMissing = (
    "worker pod {pod} needs ServiceAccount {account!r} in namespace {namespace!r} "
    "(LMFORGE_WORKER_SERVICE_ACCOUNT / the chart's workerServiceAccount): {error}"
)
ReasonSpecChanged = "SpecChanged"
MessageSpecChanged = (
    "the running gang was built from an older spec (generation {generation} changed it): replacing it"
)
ReasonGangRestarted = "GangRestarted"
MessageGangRestarted = "recreated {num_nodes} worker pods (attempt {attempt})"
ReasonNonRetryableExitCode = "NonRetryableExitCode"
MessageNonRetryableExitCode = "pod {pod} failed ({detail}): not retryable under spec.failurePolicy"
ReasonMaxRestartsExceeded = "MaxRestartsExceeded"
MessageMaxRestartsExceeded = (
    "pod {pod} failed ({detail}) after {restarts} restarts (failurePolicy.maxRestarts={max_restarts})"
)
ReasonDeadlineExceeded = "DeadlineExceeded"
MessageDeadlineExceeded = "the job ran longer than activeDeadlineSeconds={seconds}"
ReasonSuspended = "JobSuspended"
MessageSuspended = "spec.suspend is true: worker pods deleted"
ReasonResumed = "JobResumed"
MessageResumed = "spec.suspend is false: recreating worker pods (training resumes from the last checkpoint)"
ReasonTTLExpired = "TTLExpired"
MessageTTLExpired = "deleting the job {seconds}s after it finished (ttlSecondsAfterFinished)"
ReasonForceDeleted = "StuckPodForceDeleted"
MessageForceDeleted = "pod {pod} was Terminating for {seconds}s past its grace period; force-deleted"
ReasonPodDeleted = "PodDeleted"  # a worker pod vanished while the job ran (drained node, manual delete)
