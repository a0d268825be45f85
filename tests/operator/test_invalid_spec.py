"""An invalid spec is the same terminal answer for the three kinds: observe refuses it naming the
field, the kind's `invalid` decision is phase Failed, condition Failed=True with reason
InvalidSpec, observedGeneration, one Warning Event, nothing to do and nothing left to watch; a
Failed object stays Failed whatever comes next."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from lmforge.operator.builders import inferenceservice as isvc_build
from lmforge.operator.builders import quantizejob as qj_build
from lmforge.operator.builders import trainjob as tj_build
from lmforge.operator.controllers import inferenceservice, quantizejob, trainjob
from lmforge.operator.controllers.reconcile import Kind
from lmforge.operator.decision import Event

NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
INDEXES: dict[str, Any] = {"pods": {}, "jobs": {}, "deployments": {}}


def body(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "lmforge.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": "x", "namespace": "ns", "uid": "u", "generation": 3, "resourceVersion": "7"},
        "spec": spec,
    }


CASES = [
    pytest.param(
        lambda: trainjob.TrainJobs(cfg=tj_build.BuildConfig()),
        body("TrainJob", {"model": "pvc://m/x", "dataset": {"source": "pvc://d/x"}, "numNodes": 0}),
        "numNodes",
        (),
        id="trainjob",
    ),
    pytest.param(
        lambda: quantizejob.QuantizeJobs(cfg=qj_build.BuildConfig()),
        body("QuantizeJob", {"model": "gs://bucket/m", "method": "w4a16-rtn", "output": "pvc://o/x"}),
        "model",
        (),
        id="quantizejob",
    ),
    pytest.param(
        lambda: inferenceservice.InferenceServices(cfg=isvc_build.BuildConfig()),
        body("InferenceService", {"model": {"source": "gs://bucket/llama"}}),
        "model.source",
        ("Ready",),
        id="inferenceservice",
    ),
]


@pytest.mark.parametrize("make, obj, field, also_false", CASES)
def test_invalid_spec_is_terminal_failed_naming_the_field(
    make: Any, obj: dict[str, Any], field: str, also_false: tuple[str, ...]
) -> None:
    kind: Kind[Any, Any, Any] = make()
    with pytest.raises(ValueError) as refused:
        asyncio.run(kind.observe(obj, kind.new_memory(), INDEXES))
    message = str(refused.value)
    assert field in message

    decision = kind.invalid(obj, message, NOW)
    status = decision.status
    assert (status.phase, status.observed_generation) == ("Failed", 3)
    conditions = {c.type: (c.status, c.reason, c.message) for c in status.conditions}
    assert conditions["Failed"] == ("True", "InvalidSpec", message[:1024])
    for type_ in also_false:
        assert conditions[type_] == ("False", "InvalidSpec", message[:1024])
    assert decision.events == (Event("Warning", "InvalidSpec", message[:1024]),)
    assert decision.actions == () and decision.requeue_after is None

    stored = {**obj, "status": status.to_k8s()}  # Failed never changes: a later pass leaves it
    again = kind.invalid(stored, "another message", NOW)
    assert again.status == status and again.events == ()
