"""Building blocks shared by the three custom resources.

Every spec model derives from `ApiModel`: camelCase on the wire, snake_case in Python,
attribute docstrings become the CRD's `description`s, unknown fields are an error. Cross-field
checks are `Rule`s: one CEL expression for the API server (emitted as `x-kubernetes-validations`
by `lmforge.operator.crd`) and one Python predicate that pydantic runs, so a spec rejected by
`kubectl apply` is rejected by `TrainJobSpec.model_validate` with the same message, and the two
are written side by side.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from annotated_types import GroupedMetadata, MaxLen, MinLen
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, model_validator
from pydantic.alias_generators import to_camel

# --- rules -------------------------------------------------------------------------------------

RuleReason = Literal["FieldValueInvalid", "FieldValueForbidden", "FieldValueRequired", "FieldValueDuplicate"]


@dataclass(frozen=True, slots=True)
class Rule:
    """A cross-field validation. `cel` runs in the API server with `self` = the object this rule
    is attached to; `check` runs in Python on the validated model and must agree with it.
    `field_path` (e.g. ".lora") makes the API server report the error at that field. A rule
    with `check=None` is a transition rule (it reads `oldSelf`): only the API server can judge it."""

    cel: str
    message: str
    check: Callable[[Any], bool] | None
    field_path: str | None = None
    reason: RuleReason | None = None

    def as_openapi(self) -> dict[str, str]:
        out = {"rule": self.cel, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        if self.reason:
            out["reason"] = self.reason
        return out


def _emit_rules(schema: dict[str, Any], cls: type[BaseModel]) -> None:
    rules: tuple[Rule, ...] = getattr(cls, "__rules__", ())
    if rules:
        schema["x-kubernetes-validations"] = [rule.as_openapi() for rule in rules]


class ApiModel(BaseModel):
    """Base of every spec model: camelCase aliases, strict fields, `__rules__` enforced."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        json_schema_extra=_emit_rules,
    )
    __rules__: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self):
        for rule in type(self).__rules__:
            if rule.check is not None and not rule.check(self):
                raise ValueError(rule.message)
        return self

    def to_k8s(self) -> dict[str, Any]:
        """The wire form: camelCase, unset optionals omitted."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class StatusModel(BaseModel):
    """Base of every status model: written by the operator, so unknown fields are tolerated
    (an older operator reading a newer status must not crash)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        use_attribute_docstrings=True,
    )

    def to_k8s(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def sub(model: type[BaseModel], **kwargs: Any) -> Any:
    """A nested object that is always present: `default: {}` in the CRD makes the API server
    fill in the nested defaults even when the user omits the whole object."""
    return Field(default_factory=model, json_schema_extra={"default": {}}, **kwargs)


# --- scalar types ------------------------------------------------------------------------------

# Where weights, datasets and outputs live. RE2 (CEL) and Python `re` agree on this pattern (the
# same rules as lmforge.runtime.storage.uri, which the runtime parses them with). s3:// is accepted
# where the runtime reads or writes S3 (`storage_uri(field)`), refused with a message naming the
# field elsewhere (`storage_uri(field, s3=False)`).
S3_PATTERN = r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?"
URI_PATTERN = rf"^(pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?|hostPath:///.+|/.*|hf://[^/ ]+/[^/ ]+|{S3_PATTERN}|s3://.*)$"
URI_MESSAGE = (
    "must be pvc://<claim>/<path>, hostPath:///<abs path>, an absolute path, hf://<org>/<name> or "
    "s3://<bucket>/<prefix>"
)
S3_BUCKET_MESSAGE = "must be s3://<bucket>/<prefix> with a valid bucket name (3-63 characters of a-z 0-9 . -)"
_URI_RE = re.compile(URI_PATTERN)
_S3_RE = re.compile(rf"^{S3_PATTERN}$")


def s3_message(field: str) -> str:
    return (
        f"{field}: s3:// is not supported here; copy the data to a volume and use pvc://<claim>/<path> "
        "or hostPath:///<abs path>"
    )


def _check_uri(value: str) -> str:
    if not _URI_RE.match(value):
        raise ValueError(f"{value!r} {URI_MESSAGE}")
    if value.startswith("s3://") and not _S3_RE.match(value):
        raise ValueError(f"{value!r} {S3_BUCKET_MESSAGE}")
    return value


@dataclass(frozen=True, slots=True)
class _Metadata(GroupedMetadata):
    """Several Annotated metadata items as one, so a field reads `Annotated[str, local_uri("x")]`:
    a call is not a type, so `x: local_uri("x")` would be opaque to a type checker."""

    items: tuple[object, ...]

    def __iter__(self) -> Iterator[object]:
        return iter(self.items)


def local_uri(field: str, s3: bool = True) -> GroupedMetadata:
    """A model/dataset/output location: pvc://, hostPath://, an absolute path, hf:// or (where
    `s3`) s3://. The rules are CEL on the string itself, so the API server's error reads
    `spec.model: Invalid value: "ftp://x": must be pvc://...`; a refused s3:// gets its own message
    naming `field` (the spec path). Used as `Annotated[str, local_uri("spec.path")]`."""

    def no_s3(value: str) -> str:
        if not s3 and value.startswith("s3://"):
            raise ValueError(s3_message(field))
        return value

    rules = [
        {"rule": f"self.matches('{URI_PATTERN}')", "message": URI_MESSAGE},
        {
            "rule": f"!self.startsWith('s3://') || self.matches('^{S3_PATTERN}$')",
            "message": S3_BUCKET_MESSAGE,
        },
    ]
    if not s3:
        rules.append({"rule": "!self.startsWith('s3://')", "message": s3_message(field)})
    return _Metadata(
        (
            AfterValidator(no_s3),
            AfterValidator(_check_uri),
            MinLen(1),
            MaxLen(2048),
            WithJsonSchema(
                {"type": "string", "minLength": 1, "maxLength": 2048, "x-kubernetes-validations": rules}
            ),
        )
    )


# Kubernetes resource quantity ("8", 8, "64Gi", "500m").
QUANTITY_PATTERN = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)


def _check_quantity(value: int | str) -> int | str:
    if isinstance(value, str) and not _QUANTITY_RE.match(value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 8, 500m, 64Gi)")
    return value


Quantity = Annotated[
    int | str,
    AfterValidator(_check_quantity),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "x-kubernetes-int-or-string": True,
        }
    ),
]

# Kubernetes objects we pass through untouched (volumes, tolerations, env entries): the API server
# keeps every field; the pod's own validation checks them when the operator creates the pod.
PassThrough = Annotated[
    dict[str, Any],
    WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
]

Timestamp = Annotated[datetime, WithJsonSchema({"type": "string", "format": "date-time"})]

DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNSLabel = Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN)]


# --- shared objects ----------------------------------------------------------------------------


class ResourceRequirements(ApiModel):
    """Compute resources of one container, as in a pod spec (`nvidia.com/gpu` goes here)."""

    requests: dict[str, Quantity] | None = None
    """Minimum resources, e.g. {cpu: 8, memory: 64Gi}."""
    limits: dict[str, Quantity] | None = None
    """Maximum resources, e.g. {nvidia.com/gpu: 8}. Extended resources such as GPUs must be limits."""

    def gpus(self) -> int:
        """Whole GPUs asked for (limits first, then requests); 0 when none."""
        for table in (self.limits, self.requests):
            if table and "nvidia.com/gpu" in table:
                return int(table["nvidia.com/gpu"])
        return 0


class SecretKeyRef(ApiModel):
    """A key of a Secret in the resource's namespace."""

    name: DNSLabel
    """Name of the Secret."""
    key: str = Field("api-key", min_length=1, max_length=253)
    """Key inside the Secret."""


class Condition(StatusModel):
    """A Kubernetes-style condition (metav1.Condition)."""

    type: str
    """CamelCase type: Created, Running, Restarting, Succeeded, Failed, Suspended, Ready, ..."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    reason: str
    """CamelCase machine-readable reason for the last transition."""
    message: str = ""
    """Human-readable detail."""
    last_transition_time: Timestamp
    """When `status` last changed."""
    observed_generation: int | None = None
    """metadata.generation the condition was computed from."""


class LastFailure(StatusModel):
    """The root-cause pod failure (the earliest to terminate), for `kubectl describe`."""

    pod: str
    """Name of the failed pod."""
    node: str | None = None
    """Node the pod ran on."""
    exit_code: int | None = None
    """Exit code of its main container; absent when it never ran (evicted, node lost, deleted)."""
    reason: str | None = None
    """Kubelet's reason: Error, OOMKilled, Evicted, DeadlineExceeded, PodDeleted, ..."""
    message: str | None = None
    """Kubelet's message or the operator's explanation."""
    time: Timestamp | None = None
    """When the pod terminated (or the operator noticed it)."""


# --- what the CRD generator needs besides the schema -------------------------------------------


@dataclass(frozen=True, slots=True)
class PrinterColumn:
    name: str
    json_path: str
    type: Literal["string", "integer", "number", "boolean", "date"] = "string"
    description: str = ""
    priority: int = 0  # 1: only in `kubectl get -o wide`

    def as_openapi(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.type, "jsonPath": self.json_path}
        if self.description:
            out["description"] = self.description
        if self.priority:
            out["priority"] = self.priority
        return out


@dataclass(frozen=True, slots=True)
class ScaleSubresource:
    spec_replicas_path: str = ".spec.replicas"
    status_replicas_path: str = ".status.replicas"
    label_selector_path: str = ".status.selector"


@dataclass(frozen=True, slots=True)
class CrdInfo:
    """One custom resource kind: its names, models and presentation."""

    kind: str
    plural: str
    short_names: tuple[str, ...]
    spec: type[BaseModel]
    status: type[BaseModel]
    printer_columns: tuple[PrinterColumn, ...]
    description: str
    root_rules: tuple[dict[str, str], ...] = ()  # CEL on the whole object (metadata.name checks)
    scale: ScaleSubresource | None = None

    @property
    def singular(self) -> str:
        return self.kind.lower()


def name_rule(max_length: int, why: str) -> dict[str, str]:
    """CEL on the object root: metadata.name becomes a Service / hostname, so it must be a
    DNS-1035 label short enough for the suffixes the operator appends."""
    return {
        "rule": f"self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= {max_length}",
        "message": f"metadata.name must be a lowercase DNS-1035 label of at most {max_length} characters ({why})",
    }
