"""status.model from the storage initializers' pod annotations."""

from __future__ import annotations

import json
from typing import Any

from lmforge.operator.api.inferenceservice import ModelFetchStatus
from lmforge.operator.builders.storage_status import model_status

SRC = "s3://models/llama"


def pod(created: str, report: dict[str, Any] | None, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": f"p-{created}", "creationTimestamp": created}
    if report is not None:
        meta["annotations"] = {"lmforge.dev/fetch": json.dumps(report)}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:09Z"
    return {"metadata": meta}


def done(cached: bool, revision: str = "r1", num_bytes: int = 0) -> dict[str, Any]:
    return {"uri": SRC, "phase": "Done", "cached": cached, "revision": revision, "bytes": num_bytes}


def test_local_models_have_no_model_status() -> None:
    assert model_status("pvc://m/x", [pod("t1", done(False))]) is None


def test_newest_replica_decides_cached() -> None:
    pods = [pod("2026-01-01T00:00:01Z", done(False, num_bytes=500)), pod("2026-01-01T00:00:02Z", done(True))]
    assert model_status(SRC, pods) == ModelFetchStatus(
        source=SRC, revision="r1", cached=True, cached_replicas=1, downloading=0, bytes=0
    )


def test_downloading_replicas_report_the_slowest_progress() -> None:
    pods = [
        pod("2026-01-01T00:00:01Z", done(False, num_bytes=500)),
        pod(
            "2026-01-01T00:00:02Z",
            {"uri": SRC, "phase": "Downloading", "bytes": 100, "totalBytes": 500, "etaSeconds": 8},
        ),
        pod(
            "2026-01-01T00:00:03Z",
            {"uri": SRC, "phase": "Downloading", "bytes": 400, "totalBytes": 500, "etaSeconds": 1},
        ),
        pod("2026-01-01T00:00:04Z", None),  # not started yet
        pod("2026-01-01T00:00:05Z", done(True), deleting=True),  # going away: not counted
        pod("2026-01-01T00:00:06Z", {**done(True), "uri": "s3://models/old"}),  # an older spec's source
    ]
    assert model_status(SRC, pods) == ModelFetchStatus(
        source=SRC, revision="r1", cached=False, cached_replicas=0, downloading=2, bytes=100, total_bytes=500,
        eta_seconds=8,
    )  # fmt: skip


def test_initializer_failure_is_read_from_the_init_container() -> None:
    from lmforge.operator.builders.storage_status import initializer_failure

    message = "lmforge fetch: cannot download s3://models/x: access denied to bucket 'models'"
    crash_looping = {
        "status": {
            "initContainerStatuses": [
                {
                    "name": "storage-initializer",
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": message}},
                }
            ],
            "containerStatuses": [{"name": "server", "state": {"waiting": {"reason": "PodInitializing"}}}],
        }
    }
    assert initializer_failure(crash_looping) == {
        "exitCode": 1,
        "reason": "CrashLoopBackOff",
        "message": message,
    }
    fine = {
        "status": {
            "initContainerStatuses": [
                {"name": "storage-initializer", "state": {"terminated": {"exitCode": 0}}}
            ]
        }
    }
    assert initializer_failure(fine) is None
    assert initializer_failure({"status": {}}) is None
