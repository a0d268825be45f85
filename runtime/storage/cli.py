"""`lmforge fetch SRC DST` (the storage initializer: an init container of the runtime image) and
`lmforge upload SRC DST`.

    lmforge fetch s3://models/llama /mnt/model
    lmforge fetch hf://org/name /mnt/model --cache-dir /var/lib/lmforge/model-cache --cache-max-bytes 200Gi

Progress (bytes, rate, ETA) goes to stderr every few seconds and, inside a pod, to the pod's
`lmforge.dev/fetch` annotation (the operator folds it into the owner's status). Exit codes: 0
done, 1 the transfer failed (the message names the URI; also written to /dev/termination-log),
2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from lmforge.runtime.storage.progress import ANNOTATION
from lmforge.runtime.storage.uri import URIError

CACHE_DIR_ENV = "LMFORGE_MODEL_CACHE_DIR"
CACHE_MAX_ENV = "LMFORGE_MODEL_CACHE_MAX_BYTES"
TERMINATION_LOG = Path("/dev/termination-log")
ANNOTATE_INTERVAL_S = 5.0
_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}
_UNITS.update({"ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4})


def parse_bytes(text: str, name: str) -> int:
    """`200Gi`, `500M`, `1073741824` -> bytes (Kubernetes quantity suffixes)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?|[kmgt]i?)?\s*", text or "")
    if not match:
        raise ValueError(f"{name}={text!r}: expected bytes such as 500Mi or 200Gi")
    return int(float(match[1]) * _UNITS[(match[2] or "").lower()])


def add_fetch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "src", help="s3://bucket/prefix, hf://org/name[@revision], pvc://, hostPath:// or /path"
    )
    parser.add_argument("dst", help="local directory to fill")
    parser.add_argument("--repo-type", choices=("model", "dataset"), default="model", help="hf:// repo type")
    parser.add_argument(
        "--cache-dir",
        default=os.environ.get(CACHE_DIR_ENV) or None,
        help=f"node model cache directory (default: ${CACHE_DIR_ENV}; none: no cache)",
    )
    parser.add_argument(
        "--cache-max-bytes",
        default=os.environ.get(CACHE_MAX_ENV) or None,
        help=f"evict least recently used unused entries above this size (default: ${CACHE_MAX_ENV}; none: no limit)",
    )
    parser.add_argument(
        "--refresh", action="store_true", help="ask the remote for its current revision first"
    )


def add_upload_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="local file or directory")
    parser.add_argument("dst", help="s3://bucket/prefix")


def _termination_message(message: str) -> None:
    try:
        if TERMINATION_LOG.exists():
            TERMINATION_LOG.write_text(message[-4000:])
    except OSError:
        pass


class PodReport:
    """stderr lines always; the pod annotation at most every ANNOTATE_INTERVAL_S (and the last one)."""

    def __init__(self) -> None:
        from lmforge.runtime.train.progress import PodAnnotator, Throttle

        self.annotator = PodAnnotator.from_env()
        self.throttle = Throttle(interval_s=ANNOTATE_INTERVAL_S)
        self._warned = False

    def __call__(self, payload: dict[str, Any], line: str) -> None:
        print(line, file=sys.stderr, flush=True)
        if self.annotator is None or not self.throttle.ready(force=payload.get("phase") == "Done"):
            return
        try:
            self.annotator.patch({ANNOTATION: json.dumps(payload, separators=(",", ":"))})
        except Exception as exc:  # noqa: BLE001 - progress never fails a download
            if not self._warned:
                self._warned = True
                print(f"[lmforge.fetch] cannot annotate the pod: {exc}", file=sys.stderr, flush=True)


def run_fetch(args: argparse.Namespace) -> int:
    from lmforge.runtime.hub import HubError
    from lmforge.runtime.storage.cache import NodeCache
    from lmforge.runtime.storage.s3 import StorageError
    from lmforge.runtime.storage.transfer import fetch

    try:
        max_bytes = (
            None if args.cache_max_bytes is None else parse_bytes(args.cache_max_bytes, "--cache-max-bytes")
        )
    except ValueError as exc:
        print(f"lmforge fetch: {exc}", file=sys.stderr)
        return 2
    cache = NodeCache(Path(args.cache_dir), max_bytes) if args.cache_dir else None
    try:
        fetch(
            args.src,
            Path(args.dst),
            repo_type=args.repo_type,
            cache=cache,
            refresh=args.refresh,
            report=PodReport(),
        )
    except URIError as exc:
        print(f"lmforge fetch: {exc}", file=sys.stderr)
        _termination_message(str(exc))
        return 2
    except (StorageError, HubError, OSError) as exc:
        print(f"lmforge fetch: {exc}", file=sys.stderr, flush=True)
        _termination_message(f"fetch {args.src}: {exc}" if args.src not in str(exc) else str(exc))
        return 1
    return 0


def run_upload(args: argparse.Namespace) -> int:
    from lmforge.runtime.storage.s3 import StorageError
    from lmforge.runtime.storage.transfer import upload

    try:
        upload(Path(args.src), args.dst, report=PodReport())
    except URIError as exc:
        print(f"lmforge upload: {exc}", file=sys.stderr)
        return 2
    except (StorageError, OSError) as exc:
        print(f"lmforge upload: {exc}", file=sys.stderr, flush=True)
        _termination_message(str(exc))
        return 1
    return 0
