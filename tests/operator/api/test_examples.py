"""examples/*.yaml (used by the demo) parse with the API models."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmforge.operator.api import KINDS

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
SPECS = {info.kind: info.spec for info in KINDS}


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_is_valid(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        assert doc["apiVersion"] == "lmforge.dev/v1alpha1"
        SPECS[doc["kind"]].model_validate(doc["spec"])
