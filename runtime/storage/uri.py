"""Storage URIs, parsed once for every kind (TrainJob, QuantizeJob, InferenceService, adapters).

    s3://bucket/prefix          an S3 or S3-compatible store (MinIO, Ceph): AWS_ENDPOINT_URL etc.
    hf://org/name[@revision]    a Hugging Face Hub repo (HF_ENDPOINT, HF_TOKEN)
    pvc://claim/path            a PersistentVolumeClaim, mounted at $LMFORGE_PVC_ROOT/<claim>
    hostPath:///dir, file:///dir, /dir
                                a directory on the node

Pure: no I/O, no boto3. `remote` URIs are fetched (lmforge fetch) or uploaded; local ones are
mounted by the operator and opened directly.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Scheme = Literal["s3", "hf", "pvc", "hostPath", "path"]
REMOTE_SCHEMES = ("s3", "hf")
# S3 bucket names: 3-63 chars of lowercase letters, digits, dots and hyphens (AWS's rule).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_HF_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class URIError(ValueError):
    """A location that cannot be parsed; the message names the field and the value."""


@dataclass(frozen=True, slots=True)
class StorageURI:
    scheme: Scheme
    uri: str  # as written
    bucket: str = ""  # s3: the bucket; hf: the org; pvc: the claim
    key: str = ""  # s3: the prefix without slashes at either end; hf: the repo name; pvc/path: inner path
    revision: str | None = None  # hf: @revision

    @property
    def remote(self) -> bool:
        return self.scheme in REMOTE_SCHEMES

    @property
    def repo_id(self) -> str:
        """hf: org/name."""
        return f"{self.bucket}/{self.key}"

    def join(self, *parts: str) -> str:
        """A URI below this one: s3://b/p + x -> s3://b/p/x (outputs and checkpoints)."""
        tail = "/".join(p.strip("/") for p in parts if p.strip("/"))
        return f"{self.uri.rstrip('/')}/{tail}" if tail else self.uri


def _s3(uri: str, bad: Callable[[str], URIError]) -> StorageURI:
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not _BUCKET.match(bucket):
        raise bad("expected s3://<bucket>/<prefix> with a valid bucket name (3-63 of a-z 0-9 . -)")
    return StorageURI("s3", uri, bucket, prefix.strip("/"))


def _hf(uri: str, bad: Callable[[str], URIError]) -> StorageURI:
    name, _, revision = uri[len("hf://") :].partition("@")
    org, _, repo = name.partition("/")
    if not (_HF_PART.match(org) and _HF_PART.match(repo)) or "@" in revision:
        raise bad("expected hf://<org>/<name>[@<revision>]")
    return StorageURI("hf", uri, org, repo, revision or None)


def _pvc(uri: str, bad: Callable[[str], URIError]) -> StorageURI:
    claim, _, rest = uri[len("pvc://") :].partition("/")
    if not claim:
        raise bad("expected pvc://<claim>/<path>")
    return StorageURI("pvc", uri, claim, rest.strip("/"))


def _host(uri: str, bad: Callable[[str], URIError]) -> StorageURI:
    path = uri.split("://", 1)[1]
    if not path.startswith("/"):
        raise bad("expected an absolute path after the scheme (hostPath:///dir)")
    return StorageURI("hostPath", uri, key=path.rstrip("/") or "/")


_PARSERS = {"s3://": _s3, "hf://": _hf, "pvc://": _pvc, "hostPath://": _host, "file://": _host}


def parse(uri: str, field: str = "location") -> StorageURI:
    """The parsed URI, or URIError naming `field` (the spec path, e.g. `spec.model.source`)."""

    def bad(why: str) -> URIError:
        return URIError(f"{field}: {uri!r}: {why}")

    if not isinstance(uri, str) or not uri:
        raise bad("must be a non-empty string")
    for prefix, parser in _PARSERS.items():
        if uri.startswith(prefix):
            return parser(uri, bad)
    if uri.startswith("/"):
        return StorageURI("path", uri, key=uri.rstrip("/") or "/")
    scheme = uri.split("://", 1)[0] if "://" in uri else None
    raise bad(
        (f"unsupported scheme {scheme}://; " if scheme else "")
        + "expected s3://, hf://, pvc://, hostPath:// or an absolute path"
    )


def is_remote(uri: str) -> bool:
    return uri.startswith(("s3://", "hf://"))
