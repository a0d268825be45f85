"""engine.tensorParallelSize: the flag, the GPU limit (defaulted, never below the ranks; 0 = CPU ranks),
/dev/shm in RAM, the operator's NCCL_* variables, and status.parallelism (replicas, never ranks)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from lmforge.operator.api.inferenceservice import InferenceServiceSpec
from lmforge.operator.builders.inferenceservice import (
    BuildConfig,
    ServiceRef,
    nccl_env_from,
    parallel_layout,
    pod_template,
)

REF = ServiceRef(name="chat", namespace="team-a", uid="uid-1")


def make_spec(tp: int | None = None, **overrides: Any) -> InferenceServiceSpec:
    engine = {} if tp is None else {"tensorParallelSize": tp}
    return InferenceServiceSpec.model_validate(
        {"model": {"source": "pvc://models/llama/merged"}, "engine": engine, **overrides}
    )


def container(spec: InferenceServiceSpec, cfg: BuildConfig = BuildConfig()) -> dict[str, Any]:
    return pod_template(REF, spec, cfg)["spec"]["containers"][0]


@pytest.mark.parametrize(
    ("tp", "resources", "want_limits"),
    [
        (None, None, None),
        (4, None, {"nvidia.com/gpu": 4}),
        (4, {"limits": {"memory": "64Gi"}}, {"memory": "64Gi", "nvidia.com/gpu": 4}),
        (2, {"limits": {"nvidia.com/gpu": 8}}, {"nvidia.com/gpu": 8}),
        (2, {"limits": {"nvidia.com/gpu": 0}}, {"nvidia.com/gpu": 0}),  # CPU ranks (gloo)
    ],
    ids=["tp1-no-gpu", "defaulted", "defaulted-beside-memory", "more-gpus-than-ranks", "cpu-ranks"],
)
def test_gpu_limit(tp, resources, want_limits) -> None:
    spec = make_spec(tp, **({"resources": resources} if resources else {}))
    got = container(spec).get("resources", {}).get("limits")
    assert got == want_limits


def test_command_shm_and_nccl_env() -> None:
    cfg = BuildConfig(
        nccl_env=nccl_env_from({"NCCL_SOCKET_IFNAME": "eth0", "PATH": "/bin", "NCCL_DEBUG": "WARN"})
    )
    spec = make_spec(2, env=[{"name": "NCCL_DEBUG", "value": "INFO"}])
    c = container(spec, cfg)
    i = c["command"].index("--tensor-parallel-size")
    assert c["command"][i : i + 2] == ["--tensor-parallel-size", "2"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod_template(REF, spec, cfg)["spec"][
        "volumes"
    ]
    nccl = [e for e in c["env"] if e["name"].startswith("NCCL_")]
    assert nccl == [{"name": "NCCL_SOCKET_IFNAME", "value": "eth0"}, {"name": "NCCL_DEBUG", "value": "INFO"}]


def test_one_rank_changes_nothing() -> None:
    cfg = BuildConfig(nccl_env=(("NCCL_DEBUG", "WARN"),))
    c = container(make_spec(), cfg)
    assert "--tensor-parallel-size" not in c["command"]
    assert all(m["mountPath"] != "/dev/shm" for m in c["volumeMounts"])
    assert not any(e["name"].startswith("NCCL_") for e in c["env"])


def test_more_ranks_than_gpus_is_refused() -> None:
    with pytest.raises(ValidationError, match="tensorParallelSize must not exceed the nvidia.com/gpu limit"):
        make_spec(4, resources={"limits": {"nvidia.com/gpu": 2}})


@pytest.mark.parametrize(
    ("tp", "resources", "replicas", "want"),
    [
        (4, None, 2, {"tensorParallelSize": 4, "gpusPerReplica": 4, "layout": "2 replicas x TP=4 (8 GPUs)"}),
        (2, {"limits": {"nvidia.com/gpu": 0}}, 1, {"tensorParallelSize": 2, "gpusPerReplica": 0, "layout": "1 replica x TP=2 (CPU)"}),
        (None, {"limits": {"nvidia.com/gpu": 1}}, 3, {"tensorParallelSize": 1, "gpusPerReplica": 1, "layout": "3 replicas x TP=1 (3 GPUs)"}),
    ],
)  # fmt: skip
def test_parallel_layout(tp, resources, replicas, want) -> None:
    spec = make_spec(tp, **({"resources": resources} if resources else {}))
    assert parallel_layout(spec, replicas) == want
