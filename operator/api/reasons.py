"""Every condition type, Reason and Message the operator writes, for the three kinds, in one place.

JobSet style: a Reason is CamelCase and stable (dashboards, alerts and `kubectl get events
--field-selector reason=...` key on it), its Message is for humans and may change. Messages with
{placeholders} are formatted by the pure decisions (builders/*_policy.py, builders/*_status.py).
"""

from __future__ import annotations

# Kubernetes caps an Event's message at 1 KiB; conditions carry the same text, so one cap for both.
MAX_MESSAGE = 1024

# --- condition types (CamelCase, JobSet/Kubernetes style) -----------------------------------------
ConditionCreated = "Created"
ConditionRunning = "Running"
ConditionRestarting = "Restarting"
ConditionSucceeded = "Succeeded"
ConditionFailed = "Failed"
ConditionSuspended = "Suspended"
ConditionReady = "Ready"
ConditionProgressing = "Progressing"  # InferenceService
ConditionDegraded = "Degraded"  # InferenceService
ConditionScaleToZero = "ScaleToZero"  # InferenceService

# --- every kind ------------------------------------------------------------------------------------
# A spec this operator cannot run (a CRD older/newer than it, a location without a reader, an owned
# object the API server refuses): terminal Failed, the field named in the message, an Event.
ReasonInvalidSpec = "InvalidSpec"
# A reconcile pass raised (API error, connection error): retried with a backoff, visibly.
ReasonReconcileError = "ReconcileError"
ReasonPodFailed = "PodFailed"
ReasonDeadlineExceeded = "DeadlineExceeded"
MessageDeadlineExceeded = "the job ran longer than activeDeadlineSeconds={seconds}"

# --- TrainJob --------------------------------------------------------------------------------------
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
ReasonSuspended = "JobSuspended"
MessageSuspended = "spec.suspend is true: worker pods deleted"
ReasonResumed = "JobResumed"
MessageResumed = "spec.suspend is false: recreating worker pods (training resumes from the last checkpoint)"
ReasonTTLExpired = "TTLExpired"
MessageTTLExpired = "deleting the job {seconds}s after it finished (ttlSecondsAfterFinished)"
ReasonForceDeleted = "StuckPodForceDeleted"
MessageForceDeleted = "pod {pod} was Terminating for {seconds}s past its grace period; force-deleted"
ReasonPodDeleted = "PodDeleted"  # a worker pod vanished while the job ran (drained node, manual delete)

# --- QuantizeJob -----------------------------------------------------------------------------------
ReasonJobCreated = "JobCreated"
MessageJobCreated = "created Job {job}: one pod runs `lmforge quantize --method {method}`"
ReasonPodPending = "PodPending"
MessagePodPending = "waiting for the quantization pod to start{detail}"
ReasonPodRunning = "PodRunning"
MessagePodRunning = "pod {pod} is quantizing ({method})"
ReasonQuantized = "QuantizationSucceeded"
MessageQuantized = "wrote {output}{summary}"
MessagePodFailed = "pod {pod} failed ({detail}){message}"
ReasonJobFailed = "JobFailed"
ReasonJobDeleted = "JobDeleted"
MessageJobDeleted = "Job {job} disappeared before it finished"
ReasonServing = "InferenceServiceCreated"
MessageServing = "InferenceService {name} serves {output} ({replicas} replica(s))"

# --- InferenceService ------------------------------------------------------------------------------
ReasonApplied = "Applied"
MessageApplied = "applied {parts} for generation {generation} ({replicas} replica(s))"
ReasonModelFromHub = "ModelFromHub"
ReasonReplicasRestored = "ReplicasRestored"
MessageReplicasRestored = (
    "the Deployment had {current} replica(s): back to spec.replicas {replicas} "
    "(scale the InferenceService, not its Deployment)"
)
MessageOwnedObjectRefused = "the API server refused an owned object: {error}"
ReasonReplicasReady = "ReplicasReady"
ReasonNoReplicas = "NoReplicaReady"
ReasonModelLoading = "ModelLoading"
ReasonPodsPending = "PodsPending"
ReasonReplicasFailing = "ReplicasFailing"
ReasonReplicasNotReady = "ReplicasNotReady"
ReasonScaledToZero = "ScaledToZero"
ReasonRollingUpdate = "RollingUpdate"
ReasonScalingDown = "ScalingDown"
ReasonUnschedulable = "Unschedulable"
ReasonSettled = "Settled"
ReasonHealthy = "AllReplicasHealthy"
ReasonColdStart = "ColdStartAfterIdle"
MessageColdStart = (
    "minReplicas is 0: after {idle}s without running or waiting requests the service scales to zero. "
    "The first request after that waits for a cold start (a new pod loads the model, up to {startup}s). "
    "lmforge has no activator yet to hold requests and wake the service: while at zero, requests are "
    "refused until `kubectl scale deployment/{name} --replicas 1` (the autoscaler goes on from the "
    "Deployment's size) or minReplicas >= 1 brings it back"
)
ReasonScaledUp = "ScaledUp"
ReasonScaledDown = "ScaledDown"
ReasonReady = "Ready"  # phase Events: Ready, Degraded, Failed
ReasonDegraded = "Degraded"
ReasonFailed = "Failed"
