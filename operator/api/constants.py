"""Names shared by the operator, the builders and the worker pods: labels, annotations and
phases. Condition types, Reasons and their Messages live in `reasons.py`."""

from __future__ import annotations

from typing import Final

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

# Phases. Succeeded and Failed are terminal: once written they never change.
PhasePending: Final = "Pending"
PhaseRunning: Final = "Running"
PhaseRestarting: Final = "Restarting"
PhaseSucceeded: Final = "Succeeded"
PhaseFailed: Final = "Failed"
PhaseSuspended: Final = "Suspended"
TERMINAL_PHASES = frozenset({PhaseSucceeded, PhaseFailed})
