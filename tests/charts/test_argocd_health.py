"""charts/lmforge/argocd/health.lua: the Argo CD health of our kinds. Run under a real Lua
interpreter where one is installed (Debian's lua5.4, or lupa from PyPI); the phase table is also
checked as data against the phases the API declares, which needs no interpreter."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmforge.operator.api.inferenceservice import InferenceServicePhase
from lmforge.operator.api.quantizejob import QuantizeJobPhase
from lmforge.operator.api.trainjob import TrainJobPhase

ARGOCD = Path(__file__).resolve().parents[2] / "charts" / "lmforge" / "argocd"
HEALTH_LUA = ARGOCD / "health.lua"
ARGO_HEALTH = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}
KIND_PHASES = {
    "TrainJob": typing.get_args(TrainJobPhase),
    "InferenceService": typing.get_args(InferenceServicePhase),
    "QuantizeJob": typing.get_args(QuantizeJobPhase),
}
# The contract (argocd/README.md): phase -> Argo CD health once the status is current.
EXPECTED = {
    "TrainJob": {"Pending": "Progressing", "Running": "Progressing", "Restarting": "Progressing",
                 "Succeeded": "Healthy", "Failed": "Degraded", "Suspended": "Suspended"},
    "InferenceService": {"Pending": "Progressing", "Loading": "Progressing", "Ready": "Healthy",
                         "Degraded": "Degraded", "ScaledToZero": "Healthy", "Failed": "Degraded"},
    "QuantizeJob": {"Pending": "Progressing", "Running": "Progressing", "Succeeded": "Healthy",
                    "Failed": "Degraded"},
}


def lua_phase_table(source: str) -> dict[str, dict[str, str]]:
    """The PHASES table of health.lua, read as data (`Kind = { Phase = "Health", ... }`)."""
    body = re.search(r"local PHASES = \{(.*?)\n\}", source, re.S)
    assert body, "health.lua has no `local PHASES = {...}` table"
    return {kind: dict(re.findall(r"(\w+) = \"(\w+)\"", entries))
            for kind, entries in re.findall(r"(\w+) = \{(.*?)\}", body.group(1), re.S)}


def test_phase_table_covers_every_declared_phase_with_an_argo_health() -> None:
    table = lua_phase_table(HEALTH_LUA.read_text())
    assert table == EXPECTED
    for kind, phases in KIND_PHASES.items():
        assert set(table[kind]) == set(phases), f"{kind}: health.lua and the API disagree on phases"
        assert set(table[kind].values()) <= ARGO_HEALTH


def test_argocd_cm_embeds_health_lua_verbatim_for_each_kind() -> None:
    data = yaml.safe_load((ARGOCD / "argocd-cm.yaml").read_text())["data"]
    script = HEALTH_LUA.read_text()
    assert data == {f"resource.customizations.health.lmforge.dev_{kind}": script for kind in KIND_PHASES}


# --- running the script ----------------------------------------------------------------------------


def to_lua(value: Any) -> str:
    """A JSON-like value as a Lua literal (nil for None; ASCII strings)."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=True)
    if isinstance(value, list):
        return "{" + ", ".join(to_lua(v) for v in value) + "}"
    return "{" + ", ".join(f"[{json.dumps(k)}] = {to_lua(v)}" for k, v in value.items()) + "}"


def _interpreter():
    """A function (obj) -> {status, message}, or None where no Lua is installed."""
    binary = next((b for b in ("lua5.4", "lua5.3", "lua5.1", "lua", "luajit") if shutil.which(b)), None)
    if binary:
        def run(obj: dict[str, Any]) -> dict[str, str]:
            program = (f"obj = {to_lua(obj)}\nlocal hs = dofile({json.dumps(str(HEALTH_LUA))})\n"
                       "io.write(hs.status, '\\n', hs.message)")
            out = subprocess.run([binary, "-"], input=program, capture_output=True, text=True, timeout=30, check=True)
            status, message = out.stdout.split("\n", 1)
            return {"status": status, "message": message}
        return run
    try:
        import lupa  # type: ignore[import-not-found]
    except ImportError:
        return None

    def run_lupa(obj: dict[str, Any]) -> dict[str, str]:
        lua = lupa.LuaRuntime()
        lua.execute(f"obj = {to_lua(obj)}")
        hs = lua.execute(HEALTH_LUA.read_text())
        return {"status": hs["status"], "message": hs["message"]}
    return run_lupa


@pytest.fixture(scope="module")
def health():
    run = _interpreter()
    if run is None:
        pytest.skip("no Lua interpreter (apt-get install lua5.4, or pip install lupa); the phase table is "
                    "still checked as data")
    return run


def obj(kind: str, generation: int = 1, status: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"apiVersion": "lmforge.dev/v1alpha1", "kind": kind,
                            "metadata": {"name": "x", "namespace": "ns", "generation": generation}}
    if status is not None:
        body["status"] = status
    return body


@pytest.mark.parametrize(("kind", "phase", "want"), [(k, p, h) for k, m in EXPECTED.items() for p, h in m.items()],
                         ids=[f"{k}-{p}" for k, m in EXPECTED.items() for p in m])
def test_every_phase_with_a_current_status(health, kind: str, phase: str, want: str) -> None:
    result = health(obj(kind, 3, {"phase": phase, "observedGeneration": 3}))
    assert result == {"status": want, "message": phase}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_no_status_yet_is_progressing(health, kind: str) -> None:
    assert health(obj(kind)) == {"status": "Progressing",
                                 "message": f"waiting for the lmforge operator to act on the {kind}"}
    assert health(obj(kind, status={"conditions": []}))["status"] == "Progressing"


@pytest.mark.parametrize(("kind", "phase"), [("InferenceService", "Ready"), ("TrainJob", "Running"),
                                             ("TrainJob", "Suspended"), ("InferenceService", "Failed")])
def test_a_spec_not_yet_acted_on_is_progressing_whatever_the_phase(health, kind: str, phase: str) -> None:
    result = health(obj(kind, 4, {"phase": phase, "observedGeneration": 3}))
    assert result == {"status": "Progressing",
                      "message": f"generation 4 not yet acted on by the operator (status is for 3, phase {phase})"}
    assert health(obj(kind, 4, {"phase": phase}))["status"] == "Progressing"  # observedGeneration missing


@pytest.mark.parametrize(("kind", "phase", "want"), [("TrainJob", "Succeeded", "Healthy"),
                                                     ("TrainJob", "Failed", "Degraded"),
                                                     ("QuantizeJob", "Succeeded", "Healthy")])
def test_a_finished_job_keeps_its_final_health_after_a_late_spec_change(health, kind, phase, want) -> None:
    result = health(obj(kind, 5, {"phase": phase, "observedGeneration": 2}))
    assert result == {"status": want, "message": f"{phase} (spec changed after the {kind} finished: not acted on)"}


def test_message_is_the_latest_condition(health) -> None:
    conditions = [
        {"type": "Created", "status": "True", "reason": "GangCreated", "message": "created 2 worker pods",
         "lastTransitionTime": "2026-01-01T10:00:00Z"},
        {"type": "Failed", "status": "True", "reason": "MaxRestartsExceeded", "message": "pod x-0 failed (exit 1)",
         "lastTransitionTime": "2026-01-01T10:05:00Z"},
        {"type": "Running", "status": "False", "reason": "AllWorkersRunning", "message": "",
         "lastTransitionTime": "2026-01-01T10:01:00Z"},
    ]
    result = health(obj("TrainJob", 1, {"phase": "Failed", "observedGeneration": 1, "conditions": conditions}))
    assert result == {"status": "Degraded", "message": "Failed: MaxRestartsExceeded: pod x-0 failed (exit 1)"}


def test_unknown_phase_and_foreign_kind(health) -> None:
    assert health(obj("TrainJob", 1, {"phase": "Exploded", "observedGeneration": 1}))["status"] == "Unknown"
    assert health(obj("Pod", 1, {"phase": "Running"})) == {"status": "Unknown", "message": "not an lmforge kind: Pod"}
