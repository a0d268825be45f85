"""Storage URI parsing: every scheme, and errors that name the field and the value."""

from __future__ import annotations

import pytest

from lmforge.runtime.storage.uri import StorageURI, URIError, parse


@pytest.mark.parametrize(
    ("uri", "want"),
    [
        ("s3://models/llama/v1/", StorageURI("s3", "s3://models/llama/v1/", "models", "llama/v1")),
        ("s3://models", StorageURI("s3", "s3://models", "models", "")),
        ("hf://acme/tiny", StorageURI("hf", "hf://acme/tiny", "acme", "tiny")),
        ("hf://acme/tiny@v1.0", StorageURI("hf", "hf://acme/tiny@v1.0", "acme", "tiny", "v1.0")),
        ("pvc://ckpt/runs/a", StorageURI("pvc", "pvc://ckpt/runs/a", "ckpt", "runs/a")),
        ("hostPath:///data/x/", StorageURI("hostPath", "hostPath:///data/x/", key="/data/x")),
        ("file:///data", StorageURI("hostPath", "file:///data", key="/data")),
        ("/models/llama", StorageURI("path", "/models/llama", key="/models/llama")),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_parse(uri: str, want: StorageURI) -> None:
    assert parse(uri) == want
    assert want.remote == uri.startswith(("s3://", "hf://"))


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        ("s3://A_bad/x", "valid bucket name"),
        ("s3:///x", "valid bucket name"),
        ("hf://acme", r"hf://<org>/<name>\[@<revision>\]"),
        ("hf://a/b/c", r"hf://<org>/<name>"),
        ("gs://b/x", "unsupported scheme gs://"),
        ("relative/path", "expected s3://, hf://"),
        ("hostPath://rel", "absolute path"),
    ],
)
def test_bad_uris_name_field_and_value(uri: str, why: str) -> None:
    with pytest.raises(URIError, match=rf"^spec\.model\.source: '{uri}': .*{why}"):
        parse(uri, "spec.model.source")


def test_join() -> None:
    assert parse("s3://bkt/out/").join("checkpoints", "step-1/") == "s3://bkt/out/checkpoints/step-1"
