"""The lmforge.dev/v1alpha1 API: pydantic models of every custom resource's spec and status.

These models are the single source of truth: `lmforge.operator.crd` generates crds/*.yaml from
them, the controllers parse specs with them, and the worker reads its config through them. This
package imports only pydantic (the worker images use it without kopf or kubernetes).
"""

from lmforge.operator.api import inferenceservice, quantizejob, trainjob
from lmforge.operator.api.base import CrdInfo
from lmforge.operator.api.constants import API_VERSION, CATEGORY, GROUP, VERSION
from lmforge.operator.api.inferenceservice import InferenceServiceSpec, InferenceServiceStatus
from lmforge.operator.api.quantizejob import QuantizeJobSpec, QuantizeJobStatus
from lmforge.operator.api.trainjob import TrainConfig, TrainJobSpec, TrainJobStatus

KINDS: tuple[CrdInfo, ...] = (trainjob.CRD, inferenceservice.CRD, quantizejob.CRD)

__all__ = [
    "API_VERSION",
    "CATEGORY",
    "GROUP",
    "KINDS",
    "VERSION",
    "CrdInfo",
    "InferenceServiceSpec",
    "InferenceServiceStatus",
    "QuantizeJobSpec",
    "QuantizeJobStatus",
    "TrainConfig",
    "TrainJobSpec",
    "TrainJobStatus",
]
