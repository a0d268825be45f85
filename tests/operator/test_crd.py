"""The CRD generator: checked-in crds/ are current, and the schemas are structural."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from pydantic import Field

from lmforge.operator.api import KINDS
from lmforge.operator.api.base import ApiModel, PassThrough, Quantity, Rule, sub
from lmforge.operator.crd import SchemaError, custom_resource_definition, main, render_all, structural

CRDS = Path(__file__).resolve().parents[2] / "crds"


def test_checked_in_crds_are_current() -> None:
    for name, text in render_all().items():
        assert (CRDS / name).read_text() == text, f"crds/{name} is stale: run `make crds`"


def test_check_mode_reports_stale_files(tmp_path: Path, capsys) -> None:
    assert main(["--out", str(tmp_path)]) == 0
    assert main(["--out", str(tmp_path), "--check"]) == 0
    (tmp_path / "lmforge.dev_trainjobs.yaml").write_text("stale")
    assert main(["--out", str(tmp_path), "--check"]) == 1
    assert "lmforge.dev_trainjobs.yaml" in capsys.readouterr().err


class Inner(ApiModel):
    """Inner docstring."""

    size: int = Field(3, ge=1)
    """How many."""


class Sample(ApiModel):
    """Sample docstring."""

    __rules__ = (
        Rule(
            cel="self.low <= self.high",
            message="low must not exceed high",
            check=lambda s: True,
            field_path=".low",
        ),
    )

    mode: Literal["a", "b"] = "a"
    """The mode."""
    low: float = Field(0.5, gt=0, le=1)
    """Lower bound."""
    high: float = 1.0
    """Upper bound."""
    inner: Inner = sub(Inner)
    """Always there."""
    maybe: Inner | None = None
    """Optional object; the field's description wins over the docstring."""
    limits: dict[str, Quantity] | None = None
    """Quantities."""
    extra: list[PassThrough] | None = None
    """Pass-through objects."""


def test_structural_schema_of_a_sample_model() -> None:
    inner = {
        "description": "Inner docstring.",
        "type": "object",
        "properties": {"size": {"description": "How many.", "type": "integer", "default": 3, "minimum": 1}},
    }
    assert structural(Sample) == {
        "description": "Sample docstring.",
        "type": "object",
        "properties": {
            "mode": {"description": "The mode.", "type": "string", "enum": ["a", "b"], "default": "a"},
            "low": {
                "description": "Lower bound.",
                "type": "number",
                "default": 0.5,
                "minimum": 0,
                "exclusiveMinimum": True,
                "maximum": 1,
            },
            "high": {"description": "Upper bound.", "type": "number", "default": 1.0},
            "inner": {**inner, "description": "Always there.", "default": {}},
            "maybe": {
                **inner,
                "description": "Optional object; the field's description wins over the docstring.",
            },
            "limits": {
                "description": "Quantities.",
                "type": "object",
                "additionalProperties": {
                    "pattern": structural(Sample)["properties"]["limits"]["additionalProperties"]["pattern"],
                    "anyOf": [{"type": "integer"}, {"type": "string"}],
                    "x-kubernetes-int-or-string": True,
                },
            },
            "extra": {
                "description": "Pass-through objects.",
                "type": "array",
                "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            },
        },
        "x-kubernetes-validations": [
            {"fieldPath": ".low", "message": "low must not exceed high", "rule": "self.low <= self.high"}
        ],
    }


def test_unions_without_structural_form_are_refused() -> None:
    class Bad(ApiModel):
        value: int | list[int] = 1

    with pytest.raises(SchemaError):
        structural(Bad)


def _walk(node: Any, path: str = ""):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


@pytest.mark.parametrize("info", KINDS, ids=[k.kind for k in KINDS])
def test_schemas_are_structural_and_documented(info) -> None:
    schema = custom_resource_definition(info)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert not {"$ref", "$defs", "title", "nullable", "allOf", "const"} & set(node), path
        if node.get("additionalProperties") is False:
            pytest.fail(f"additionalProperties: false at {path}")
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string"), path
        for rule in node.get("x-kubernetes-validations", ()):
            assert "\\" not in rule["rule"], f"CEL string escapes at {path}: {rule['rule']}"
    spec = schema["properties"]["spec"]
    for path, node in _walk(spec):
        if path.endswith(".properties"):
            for name, prop in node.items():
                assert prop.get("description"), f"spec{path}.{name} has no description"


def test_names_printer_columns_and_subresources() -> None:
    crds = {info.kind: custom_resource_definition(info) for info in KINDS}
    names = {kind: crd["spec"]["names"] for kind, crd in crds.items()}
    assert {kind: (n["plural"], n["shortNames"], n["categories"]) for kind, n in names.items()} == {
        "TrainJob": ("trainjobs", ["lmtj"], ["lmforge"]),
        "InferenceService": ("inferenceservices", ["lmisvc"], ["lmforge"]),
        "QuantizeJob": ("quantizejobs", ["lmqj"], ["lmforge"]),
    }
    columns = {
        kind: [
            c["name"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"] if "priority" not in c
        ]
        for kind, crd in crds.items()
    }
    assert columns == {
        "TrainJob": ["Phase", "Nodes", "Progress", "Loss", "ETA", "Restarts", "Age"],
        "InferenceService": ["Phase", "Ready", "Replicas", "URL", "Age"],
        "QuantizeJob": ["Phase", "Method", "Size", "Age"],
    }
    subresources = {kind: crd["spec"]["versions"][0]["subresources"] for kind, crd in crds.items()}
    assert subresources["InferenceService"] == {
        "status": {},
        "scale": {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        },
    }
    assert subresources["TrainJob"] == subresources["QuantizeJob"] == {"status": {}}


def test_kopf_peering_crds() -> None:
    docs = list(yaml.safe_load_all(render_all()["kopf-peering.yaml"]))
    assert [(d["metadata"]["name"], d["spec"]["scope"]) for d in docs] == [
        ("clusterkopfpeerings.kopf.dev", "Cluster"),
        ("kopfpeerings.kopf.dev", "Namespaced"),
    ]
    for doc in docs:
        status = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
        assert status == {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
