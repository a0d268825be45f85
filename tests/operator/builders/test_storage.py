"""One in-pod location convention for every kind's storage URIs."""

from __future__ import annotations

import pytest

from lmforge.operator.builders.storage import Location, locate


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        pytest.param(
            "pvc://models/llama/merged",
            Location("pvc", "/mnt/pvc/models", "/mnt/pvc/models/llama/merged", "models"),
            id="pvc-subpath",
        ),
        pytest.param(
            "pvc://models", Location("pvc", "/mnt/pvc/models", "/mnt/pvc/models", "models"), id="pvc-root"
        ),
        pytest.param(
            "pvc://models/",
            Location("pvc", "/mnt/pvc/models", "/mnt/pvc/models", "models"),
            id="pvc-trailing-slash",
        ),
        pytest.param(
            "hostPath:///data/ckpt/", Location("hostPath", "/data/ckpt", "/data/ckpt"), id="hostpath"
        ),
        pytest.param("/data/ckpt", Location("path", "/data/ckpt", "/data/ckpt"), id="plain-path"),
        pytest.param("hf://meta-llama/Llama-3.2-1B", None, id="hf-remote"),
        pytest.param("s3://bucket/key", None, id="s3-remote"),
    ],
)
def test_locate(uri: str, expected: Location | None) -> None:
    assert locate(uri) == expected


def test_pvc_volume_name_is_a_dns_label() -> None:
    location = locate("pvc://" + "a" * 70 + "/x")
    assert location is not None and len(location.pvc_volume_name) <= 63
