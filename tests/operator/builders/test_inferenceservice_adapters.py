"""LoRA adapters of an InferenceService, decided without a cluster: where an adapter lives in the
pods (or why it cannot be served without a restart), which TrainJobs add one, what each ready replica
is told to load/unload (AdapterCall actions) and what status.adapters says. Table-driven."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from lmforge.operator.api.inferenceservice import InferenceServiceSpec, InferenceServiceStatus
from lmforge.operator.api.trainjob import TrainJobSpec
from lmforge.operator.builders import inferenceservice as build
from lmforge.operator.builders.inferenceservice_adapters import TrainJobView, Wanted, wanted
from lmforge.operator.builders.inferenceservice_policy import Observed, decide
from lmforge.operator.builders.inferenceservice_status import DeploymentView, ServingPod
from lmforge.operator.decision import AdapterCall

NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
REF = build.ServiceRef(name="chat", namespace="team-a", uid="uid-1")
LORA = {"lora": {"maxLoras": 4, "adapterRoots": ["hostPath:///data/adapters", "pvc://tuned"]}}


def spec(**overrides: Any) -> InferenceServiceSpec:
    base = {"model": {"source": "pvc://models/llama"}, "engine": LORA}
    return InferenceServiceSpec.model_validate({**base, **overrides})


# --- the pod template never depends on the adapter list -----------------------------------------


def test_template_is_the_same_for_any_adapter_list() -> None:
    """Adding/removing/changing adapters must not roll the Deployment: same template, byte for byte."""
    none = build.pod_template(REF, spec())
    some = build.pod_template(
        REF,
        spec(adapters=[{"name": "sql", "source": "pvc://tuned/sql"}, {"name": "x", "fromTrainJob": "tj"}]),
    )
    assert none == some
    command = none["spec"]["containers"][0]["command"]
    assert command[command.index("--enable-lora") :][:6] == [
        "--enable-lora", "--allow-runtime-lora-updating", "--max-loras", "4", "--max-lora-rank", "16",
    ]  # fmt: skip


def test_without_engine_lora_no_lora_flags_or_volumes() -> None:
    template = build.pod_template(
        REF, InferenceServiceSpec.model_validate({"model": {"source": "pvc://models/x"}})
    )
    assert "--enable-lora" not in template["spec"]["containers"][0]["command"]
    assert [v["name"] for v in template["spec"]["volumes"]] == ["model"]


def test_adapter_roots_are_mounted_read_only_once() -> None:
    """The model's claim is mounted already: a root on it adds nothing; others get one volume each."""
    s = spec(engine={"lora": {"adapterRoots": ["pvc://models", "hostPath:///data/adapters", "pvc://tuned"]}})
    template = build.pod_template(REF, s)
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    mounts = {m["name"]: m for m in template["spec"]["containers"][0]["volumeMounts"]}
    assert set(volumes) == {"model", "lora-root-1", "lora-root-2"}
    assert volumes["lora-root-1"]["hostPath"] == {"path": "/data/adapters", "type": "Directory"}
    assert volumes["lora-root-2"]["persistentVolumeClaim"] == {"claimName": "tuned", "readOnly": True}
    assert mounts["lora-root-2"] == {"name": "lora-root-2", "mountPath": "/mnt/pvc/tuned", "readOnly": True}


# --- where an adapter lives ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "source, path",
    [
        ("pvc://tuned/sql", "/mnt/pvc/tuned/sql"),  # an adapterRoots claim
        ("pvc://models/adapters/a", "/mnt/pvc/models/adapters/a"),  # the model's own claim
        ("hostPath:///data/adapters/b", "/data/adapters/b"),  # a hostPath root
        ("/data/adapters/c/", "/data/adapters/c"),  # a plain path under it
        ("/mnt/user/d", "/mnt/user/d"),  # under a spec.volumeMounts path
    ],
)
def test_adapter_paths_inside_the_pods(source: str, path: str) -> None:
    s = spec(
        adapters=[{"name": "a", "source": source}],
        volumes=[{"name": "u", "emptyDir": {}}],
        volumeMounts=[{"name": "u", "mountPath": "/mnt/user"}],
    )
    assert wanted("chat", s, ()).paths == {"a": path}


@pytest.mark.parametrize(
    "source, words",
    [
        ("pvc://other/sql", "not on a volume the pods mount"),  # a claim nobody mounts
        ("hostPath:///data/adapters-old/x", "not on a volume the pods mount"),  # a prefix is not a parent
        ("hf://org/adapter", "loaded from local disk"),
    ],
)
def test_adapters_that_need_a_restart_are_invalid_naming_the_field(source: str, words: str) -> None:
    s = spec(adapters=[{"name": "ok", "source": "pvc://tuned/a"}, {"name": "bad", "source": source}])
    with pytest.raises(ValueError, match=r"spec\.adapters\[1\]\.source") as error:
        wanted("chat", s, ())
    assert words in str(error.value)


@pytest.mark.parametrize(
    "adapters, engine, message",
    [
        ([{"name": "a", "source": "/x"}, {"name": "a", "fromTrainJob": "t"}], LORA, "name 'a' is used twice"),
        ([{"name": "a"}], LORA, "exactly one of source or fromTrainJob"),
        ([{"name": "a", "source": "/x", "fromTrainJob": "t"}], LORA, "exactly one of source or fromTrainJob"),
        ([{"name": "a", "source": "/x"}], {}, "adapters needs engine.lora"),
        ([{"name": "a b", "source": "/x"}], LORA, "pattern"),
    ],
)
def test_adapter_spec_is_checked(adapters: list, engine: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        InferenceServiceSpec.model_validate(
            {"model": {"source": "/m"}, "engine": engine, "adapters": adapters}
        )


# --- TrainJobs as adapter sources ----------------------------------------------------------------


def job(name: str, **fields: Any) -> TrainJobView:
    base: dict[str, Any] = {"phase": "Succeeded", "output_dir": f"pvc://tuned/{name}"}
    return TrainJobView(name=name, **{**base, **fields})


@pytest.mark.parametrize(
    "jobs, paths, errors",
    [
        ([job("tj")], {"sql": "/mnt/pvc/tuned/tj"}, {}),
        ([job("tj", phase="Running")], {}, {"sql": "waiting for TrainJob tj to succeed (phase Running)"}),
        ([], {}, {"sql": "TrainJob tj not found"}),
        ([job("tj", method="full")], {}, {"sql": "TrainJob tj has method full: it writes no adapter"}),
        ([job("tj", output_dir="pvc://elsewhere/tj")], {}, {"sql": "not on a volume"}),
    ],
)
def test_from_train_job(jobs: list[TrainJobView], paths: dict, errors: dict) -> None:
    result = wanted("chat", spec(adapters=[{"name": "sql", "fromTrainJob": "tj"}]), jobs)
    assert result.paths == paths
    assert result.errors.keys() == errors.keys()
    assert all(errors[k] in result.errors[k] for k in errors)


def test_serve_after_adds_the_adapter_of_a_succeeded_job_on_the_named_service_only() -> None:
    jobs = [
        job("tj-a", serve_on="chat", adapter_name="a"),
        job("tj-b", serve_on="chat"),  # adapterName defaults to the job's name
        job("tj-c", serve_on="other"),
        job("tj-d", serve_on="chat", adapter_name="sql"),  # a spec entry of that name wins
    ]
    result = wanted("chat", spec(adapters=[{"name": "sql", "source": "pvc://tuned/s"}]), jobs)
    assert result.paths == {
        "sql": "/mnt/pvc/tuned/s",
        "a": "/mnt/pvc/tuned/tj-a",
        "tj-b": "/mnt/pvc/tuned/tj-b",
    }
    assert result.names == ("sql", "a", "tj-b")


def test_trainjob_view_reads_the_trainjob() -> None:
    body = {
        "metadata": {"name": "tj"},
        "spec": {
            "method": "lora",
            "output": {"dir": "pvc://tuned/tj"},
            "serveAfter": {"inferenceService": "chat"},
        },
        "status": {"phase": "Succeeded"},
    }
    assert TrainJobView.from_trainjob(body) == TrainJobView(
        "tj", "lora", "Succeeded", "pvc://tuned/tj", "chat"
    )


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"method": "full"}, "serveAfter may only be set when method is lora"),
        (
            {"output": {"dir": "/o", "mergeAdapter": True}},
            "serveAfter cannot be combined with output.mergeAdapter",
        ),
    ],
)
def test_trainjob_serve_after_combinations_are_refused(fields: dict, message: str) -> None:
    base = {
        "model": "/m",
        "dataset": {"source": "/d.jsonl"},
        "output": {"dir": "/o"},
        "serveAfter": {"inferenceService": "chat", "adapterName": "sql"},
    }
    TrainJobSpec.model_validate(base)  # valid as it is
    with pytest.raises(ValidationError, match=message):
        TrainJobSpec.model_validate({**base, **fields})


# --- the decision: AdapterCall actions and status.adapters --------------------------------------


def observed(**fields: Any) -> Observed:
    base: dict[str, Any] = {
        "name": "chat",
        "namespace": "team-a",
        "uid": "uid-1",
        "generation": 2,
        "spec": spec(),
        "status": InferenceServiceStatus(observed_generation=2),
        "deployment": DeploymentView(replicas=2, generation=1, observed_generation=1, updated_replicas=2),
        "pods": (ServingPod("p1", ready=True, started=True), ServingPod("p2", ready=True, started=True)),
        "now": NOW,
        "current": 2,
        "pod_urls": {"p1": "http://10.0.0.1:8000", "p2": "http://10.0.0.2:8000"},
    }
    return Observed(**{**base, **fields})


def calls(decision: Any) -> list[tuple[str, str, str, str | None]]:
    return [(a.pod, a.verb, a.name, a.path) for a in decision.actions if isinstance(a, AdapterCall)]


@pytest.mark.parametrize(
    "want, served, expected",
    [
        pytest.param(  # a new adapter: loaded into every ready replica
            {"a": "/d/a"}, {"p1": {}, "p2": {}}, [("p1", "load", "a", "/d/a"), ("p2", "load", "a", "/d/a")],
            id="add",
        ),
        pytest.param(  # a new replica (p2) gets what the others serve
            {"a": "/d/a"}, {"p1": {"a": "/d/a"}, "p2": {}}, [("p2", "load", "a", "/d/a")], id="new-replica",
        ),
        pytest.param(  # removed from the spec: unloaded
            {}, {"p1": {"a": "/d/a"}, "p2": {"a": "/d/a"}}, [("p1", "unload", "a", None), ("p2", "unload", "a", None)],
            id="remove",
        ),
        pytest.param(  # another directory: unload, then load the new one
            {"a": "/d/a2"}, {"p1": {"a": "/d/a"}},
            [("p1", "unload", "a", None), ("p1", "load", "a", "/d/a2")], id="change",
        ),
        pytest.param({"a": "/d/a"}, {"p1": {"a": "/d/a"}, "p2": {"a": "/d/a"}}, [], id="in-sync"),
        pytest.param({"a": "/d/a"}, {}, [], id="no-replica-answered"),
    ],
)  # fmt: skip
def test_adapter_calls(want: dict, served: dict, expected: list) -> None:
    decision = decide(observed(adapters=Wanted(want, {}, tuple(want)), served=served))
    assert calls(decision) == expected


def test_status_lists_replicas_and_last_errors() -> None:
    want = Wanted(
        {"a": "/d/a", "b": "/d/b"},
        {"c": "waiting for TrainJob tj to succeed (phase Running)"},
        ("a", "b", "c"),
    )
    served = {"p1": {"a": "/d/a"}, "p2": {"a": "/d/a"}}
    decision = decide(observed(adapters=want, served=served, load_errors={"b": "p1: rank 32 > 16 in /d/b"}))
    entries = [e.to_k8s() for e in decision.status.adapters]
    assert entries == [
        {"name": "a", "path": "/d/a", "replicas": ["p1", "p2"]},
        {"name": "b", "path": "/d/b", "replicas": [], "lastError": "p1: rank 32 > 16 in /d/b"},
        {"name": "c", "replicas": [], "lastError": "waiting for TrainJob tj to succeed (phase Running)"},
    ]
    assert decision.status.adapters_summary == "a 2/2, b 0/2, c 0/2"
    assert [c[1:3] for c in calls(decision)] == [("load", "b"), ("load", "b")]


def test_no_adapters_no_calls_and_no_summary() -> None:
    decision = decide(observed(served={"p1": {}, "p2": {}}))
    assert (
        calls(decision) == [] and decision.status.adapters == [] and decision.status.adapters_summary is None
    )


def test_not_applied_yet_makes_no_calls() -> None:
    decision = decide(observed(applied=False, adapters=Wanted({"a": "/d/a"}, {}, ("a",)), served={"p1": {}}))
    assert calls(decision) == []


# --- the contract runs AdapterCall actions through the kind's HTTP executor ---------------------


def test_execute_hands_adapter_calls_to_http_in_order_after_kube_actions() -> None:
    import asyncio

    from lmforge.operator.controllers import reconcile
    from lmforge.operator.decision import Scale

    done: list[str] = []

    class Api:  # only scale is used here; the calls must not reach the API client
        async def scale(self, *args: Any) -> None:
            done.append("scale")

    async def http(call: AdapterCall) -> None:
        done.append(f"{call.verb} {call.name} on {call.pod}")

    actions = (
        Scale("apps/v1", "Deployment", "team-a", "chat", 2),
        AdapterCall("p1", "http://10.0.0.1:8000", "unload", "a"),
        AdapterCall("p2", "http://10.0.0.2:8000", "load", "b", "/d/b"),
    )
    asyncio.run(reconcile.execute(Api(), actions, http))  # type: ignore[arg-type]
    assert done == ["scale", "unload a on p1", "load b on p2"]
    with pytest.raises(NotImplementedError, match="HTTP executor"):
        asyncio.run(reconcile.execute(Api(), actions[1:]))  # type: ignore[arg-type]


def test_engine_error_body_becomes_the_last_error() -> None:
    from lmforge.operator.controllers.inferenceservice import _error_message

    body = '{"error": {"message": "adapter_config.json: r=32 exceeds --max-lora-rank 16", "type": "x"}}'
    assert _error_message(body) == "adapter_config.json: r=32 exceeds --max-lora-rank 16"
    assert _error_message("Internal Server Error") == "Internal Server Error"


def test_lora_with_tensor_parallelism_is_refused_naming_the_field() -> None:
    """The engine refuses LoRA under tensor_parallel_size > 1; the API says so before a pod starts."""
    with pytest.raises(
        ValueError, match=r"engine.lora cannot be combined with engine.tensorParallelSize > 1"
    ):
        spec(engine={**LORA, "tensorParallelSize": 2})
