"""stages.yaml: parses, covers the whole lifecycle, and the fate selector accepts what it should."""

import re
from pathlib import Path

import pytest
import yaml

from lmforge.devcluster.cluster.components import STAGES_FILE

STAGES = list(yaml.safe_load_all(Path(STAGES_FILE).read_text()))
BY_NAME = {s["metadata"]["name"]: s for s in STAGES}


def _keys(stage):
    return [e["key"] for e in stage["spec"]["selector"]["matchExpressions"]]


def test_all_documents_are_named_stages():
    assert all(s["apiVersion"] == "kwok.x-k8s.io/v1alpha1" and s["kind"] == "Stage" for s in STAGES)
    assert len(BY_NAME) == len(STAGES)


def test_full_lifecycle_is_present_because_kwok_has_no_defaults_once_given_stages():
    kinds = {(s["spec"]["resourceRef"]["kind"], s["metadata"]["name"]) for s in STAGES}
    assert {k for k, _ in kinds} == {"Node", "Pod"}
    assert {
        "lmforge-node-initialize",
        "lmforge-node-heartbeat",
        "lmforge-pod-running",
        "lmforge-pod-readiness",
        "lmforge-pod-fate",
        "lmforge-job-pod-complete",
        "lmforge-pod-delete",
    } == set(BY_NAME)


def test_fate_stage_reads_the_annotation_and_writes_exit_code_and_phase():
    stage = BY_NAME["lmforge-pod-fate"]
    template = stage["spec"]["next"]["statusTemplate"]
    assert 'index .metadata.annotations "lmforge.dev/fate"' in template
    assert "exitCode: {{ $code }}" in template
    assert "phase: {{ if eq $code 0 }}Succeeded{{ else }}Failed{{ end }}" in template
    assert (
        stage["spec"]["delay"]["durationFrom"]["expressionFrom"]
        == '.metadata.annotations["lmforge.dev/fate-delay"]'
    )


@pytest.mark.parametrize(
    ("fate", "matches"),
    [
        ("succeed", True),
        ("fail-3", True),
        ("fail-137", True),
        ("run", False),
        ("fail-", False),
        ("fail-x", False),
        ("succeeded", False),
    ],
)
def test_fate_selector_regex(fate, matches):
    key = next(k for k in _keys(BY_NAME["lmforge-pod-fate"]) if "test(" in k)
    pattern = re.search(r'test\("(.+)"\)', key).group(1)
    assert bool(re.match(pattern, fate)) is matches


def test_job_pods_complete_only_without_a_fate_and_deletion_honours_finalizers():
    assert '.metadata.annotations["lmforge.dev/fate"]' in _keys(BY_NAME["lmforge-job-pod-complete"])
    delete = BY_NAME["lmforge-pod-delete"]["spec"]
    assert delete["next"] == {"delete": True}
    assert {"key": ".metadata.finalizers", "operator": "DoesNotExist"} in delete["selector"][
        "matchExpressions"
    ]


def test_terminal_and_running_stages_never_touch_pods_being_deleted():
    for name in (
        "lmforge-pod-running",
        "lmforge-pod-readiness",
        "lmforge-pod-fate",
        "lmforge-job-pod-complete",
    ):
        assert {"key": ".metadata.deletionTimestamp", "operator": "DoesNotExist"} in BY_NAME[name]["spec"][
            "selector"
        ]["matchExpressions"]
