"""Remote locations for the workers (trainer, quantizer): s3:// and hf:// inputs are downloaded
into a node-local staging directory before the work starts; s3:// outputs and checkpoints are
written to a staging directory and uploaded (manifest last), so a reader of the prefix never sees
a half-written checkpoint.

    $LMFORGE_STAGING_DIR (default /tmp/lmforge-staging)/<hash of the URI>/

Local ranks of a node share one download (a file lock per URI; the fetch marker makes the
others' call a no-op)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from lmforge.runtime.storage import cache as node_cache
from lmforge.runtime.storage.transfer import fetch, upload
from lmforge.runtime.storage.uri import parse

STAGING_ENV = "LMFORGE_STAGING_DIR"
DEFAULT_STAGING = "/tmp/lmforge-staging"
_STEP = re.compile(r"^step-(\d{8})$")


def staging_dir(uri: str) -> Path:
    """Where the local copy of `uri` lives on this node (not created)."""
    return Path(os.environ.get(STAGING_ENV) or DEFAULT_STAGING) / node_cache.key(uri)


def local_input(uri: str, *, repo_type: str = "model") -> Path:
    """The local copy of an s3:// or hf:// input, downloaded once per node (raises StorageError or
    HubError naming the URI)."""
    target = staging_dir(uri)
    with node_cache.flocked(target.parent / f".{target.name}.lock"):
        fetch(uri, target, repo_type=repo_type)
    return target


def publish(local: Path, uri: str) -> dict[str, Any]:
    """Upload a finished output directory (manifest last)."""
    return upload(local, uri)


def _client() -> Any:
    from lmforge.runtime.storage import s3

    return s3.client(workers=s3.settings()[1])


def remote_checkpoints(uri: str) -> list[int]:
    """Steps of the complete checkpoints (those with a manifest) under s3://bucket/prefix, oldest first."""
    from lmforge.runtime.storage.s3 import MANIFEST

    parsed = parse(uri)
    prefix = f"{parsed.key}/" if parsed.key else ""
    steps = []
    for page in _client().get_paginator("list_objects_v2").paginate(Bucket=parsed.bucket, Prefix=prefix):
        for item in page.get("Contents") or ():
            rel = item["Key"][len(prefix) :]
            name, _, rest = rel.partition("/")
            if rest == MANIFEST and (m := _STEP.match(name)):
                steps.append(int(m[1]))
    return sorted(steps)


def pull_newest_checkpoint(uri: str, local_root: Path, name: str) -> Path | None:
    """Download checkpoint `name` (step-XXXXXXXX) of s3://.../ into local_root/name."""
    target = local_root / name
    with node_cache.flocked(local_root / f".{name}.lock"):
        fetch(parse(uri).join(name), target)
    (target / ".lmforge-fetch.json").unlink(missing_ok=True)  # not a checkpoint file
    return target


def push_checkpoint(local_dir: Path, uri: str, keep_steps: list[int]) -> None:
    """Upload a committed checkpoint directory to <uri>/<its name> (manifest last), then delete the
    remote checkpoints whose steps are not in `keep_steps` (keep-last-K, as the local prune)."""
    upload(local_dir, parse(uri).join(local_dir.name))
    parsed = parse(uri)
    client = _client()
    for step in remote_checkpoints(uri):
        if step in keep_steps:
            continue
        prefix = f"{parsed.key}/step-{step:08d}/" if parsed.key else f"step-{step:08d}/"
        from lmforge.runtime.storage.s3 import MANIFEST

        client.delete_object(Bucket=parsed.bucket, Key=prefix + MANIFEST)  # incomplete first
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=parsed.bucket, Prefix=prefix):
            for item in page.get("Contents") or ():
                client.delete_object(Bucket=parsed.bucket, Key=item["Key"])
