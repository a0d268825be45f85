"""`fetch(SRC, DST)`: a remote location (s3://, hf://) into a local directory, through the node
cache when one is configured; `upload(SRC, DST)`: a local directory to s3:// with its manifest
written last. What `lmforge fetch` (the storage initializer) and the workers call.

DST gets `.lmforge-fetch.json` last ({uri, revision, cached, bytes, entry}): the server reads it to
hold its cache entry, and a restarted pod whose DST already has it for the same URI starts
without a request.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from lmforge.runtime.storage import cache as node_cache
from lmforge.runtime.storage import s3
from lmforge.runtime.storage.progress import Meter
from lmforge.runtime.storage.uri import StorageURI, parse

MARKER = ".lmforge-fetch.json"
Report = Callable[[dict[str, Any], str], None]


@dataclass(frozen=True, slots=True)
class FetchResult:
    uri: str
    path: str  # the local directory (DST)
    revision: str
    cached: bool  # True: served from the node cache, nothing downloaded
    bytes: int  # bytes downloaded now
    seconds: float
    entry: str | None = None  # the node cache entry DST links into


def print_report(payload: dict[str, Any], line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Remote:
    """One remote location, resolved: its revision now, its size when known, and a download."""

    def __init__(self, uri: StorageURI, repo_type: str, env: Mapping[str, str]) -> None:
        self.uri, self.repo_type = uri, repo_type
        self.chunk_bytes, self.workers = s3.settings(env)
        self.total_bytes: int | None = None
        if uri.scheme == "s3":
            self.client = s3.client(env, self.workers)
            self.listing = s3.list_uri(self.client, uri.uri)
            self.revision, self.total_bytes = self.listing.revision, self.listing.total_bytes
        else:
            from lmforge.runtime import hub

            self.revision = hub.revision_of(uri.uri, repo_type=repo_type)

    def download(self, target: Path, on_bytes: Callable[[int], None]) -> int:
        target.mkdir(parents=True, exist_ok=True)
        if self.uri.scheme == "s3":
            return s3.download(
                self.client,
                self.listing,
                target,
                chunk_bytes=self.chunk_bytes,
                workers=self.workers,
                on_bytes=on_bytes,
            )
        from lmforge.runtime import hub

        hub.snapshot_to(f"hf://{self.uri.repo_id}@{self.revision}", target, repo_type=self.repo_type)
        return sum(p.stat().st_size for p in target.rglob("*") if p.is_file())


def _write_marker(dst: Path, result: FetchResult) -> None:
    tmp = dst / f"{MARKER}.tmp"
    tmp.write_text(json.dumps(asdict(result), indent=1, sort_keys=True))
    tmp.replace(dst / MARKER)


def read_marker(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(directory) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def fetch(
    src: str,
    dst: Path,
    *,
    repo_type: str = "model",
    cache: node_cache.NodeCache | None = None,
    refresh: bool = False,
    report: Report = print_report,
    env: Mapping[str, str] | None = None,
) -> FetchResult:
    """SRC (s3://, hf:// or a local directory) into DST; raises StorageError / HubError naming SRC."""
    env = os.environ if env is None else env
    uri = parse(src, "source")
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    done = read_marker(dst)
    entry = (done or {}).get("entry")
    entry_gone = bool(entry) and node_cache.NodeCache.read_entry(Path(str(entry))) is None
    if done is not None and done.get("uri") == src and not refresh and not entry_gone:  # a restarted pod
        result = FetchResult(**{**done, "cached": True, "bytes": 0, "seconds": 0.0})
        report(_payload(result, None), f"[lmforge.fetch] {src}: already in {dst}")
        return result
    if not uri.remote:
        local = (
            Path(uri.key)
            if uri.scheme != "pvc"
            else Path(env.get("LMFORGE_PVC_ROOT", "/mnt/pvc"), uri.bucket, uri.key)
        )
        shutil.copytree(local, dst, dirs_exist_ok=True, symlinks=False)
        size = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
        result = FetchResult(src, str(dst), "local", False, size, time.monotonic() - started)
    elif cache is None:
        remote = Remote(uri, repo_type, env)
        meter = Meter(src, remote.total_bytes, report)
        fetched = remote.download(dst, meter.add)
        result = FetchResult(src, str(dst), remote.revision, False, fetched, time.monotonic() - started)
    else:
        result = _through_cache(uri, dst, repo_type, cache, refresh, report, env, started)
    _write_marker(dst, result)
    report(_payload(result, result.bytes), _done_line(result))
    return result


def _through_cache(
    uri: StorageURI,
    dst: Path,
    repo_type: str,
    cache: node_cache.NodeCache,
    refresh: bool,
    report: Report,
    env: Mapping[str, str],
    started: float,
) -> FetchResult:
    src = uri.uri
    entry = None if refresh else cache.lookup(src)  # warm: no request at all
    cached = entry is not None
    fetched = 0
    if entry is None:
        with node_cache.flocked(cache.uri_lock(src)):  # one download per URI on the node
            entry = None if refresh else cache.lookup(src)  # another pod finished it meanwhile
            cached = entry is not None
            if entry is None:
                remote = Remote(uri, repo_type, env)
                entry = cache.get(src, remote.revision)
                cached = entry is not None
                if entry is None:
                    path = cache.entry_dir(src, remote.revision)
                    meter = Meter(src, remote.total_bytes, report)
                    fetched = remote.download(path / "data", meter.add)
                    total = sum(p.stat().st_size for p in (path / "data").rglob("*") if p.is_file())
                    entry = cache.commit(src, remote.revision, total)
                    report(
                        meter.finish(cached=False),
                        f"[lmforge.fetch] {src}: {fetched} bytes into the node cache",
                    )
    held = node_cache.hold(entry.path)  # eviction skips it while DST is being linked
    try:
        node_cache.link_tree(entry.data, dst)
    finally:
        held.close()
    return FetchResult(
        src,
        str(dst),
        entry.revision,
        cached,
        fetched,
        time.monotonic() - started,
        str(entry.path),
    )


def _payload(result: FetchResult, fetched: int | None) -> dict[str, Any]:
    return {
        "uri": result.uri,
        "phase": "Done",
        "bytes": result.bytes if fetched is None else fetched,
        "revision": result.revision,
        "cached": result.cached,
        "seconds": round(result.seconds, 3),
    }


def _done_line(result: FetchResult) -> str:
    how = "from the node cache" if result.cached else f"{result.bytes} bytes downloaded"
    return f"[lmforge.fetch] {result.uri} -> {result.path}: {how} in {result.seconds:.2f}s (revision {result.revision})"


def upload(
    src: Path, dst: str, *, report: Report = print_report, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """A local file or directory to s3://bucket/prefix (manifest last); returns the manifest's files."""
    env = os.environ if env is None else env
    parse(dst, "destination")
    chunk_bytes, workers = s3.settings(env)
    src = Path(src)
    total = sum(p.stat().st_size for p in s3.local_files(src).values())
    meter = Meter(dst, total, report, phase="Uploading")
    files = s3.upload_dir(
        s3.client(env, workers), src, dst, chunk_bytes=chunk_bytes, workers=workers, on_bytes=meter.add
    )
    meter.finish()
    return files


@contextlib.contextmanager
def holding(model_dir: Path) -> Iterator[IO[bytes] | None]:
    """While the block runs, the node cache entry `model_dir` links into (if any) is not evicted."""
    marker = read_marker(model_dir)
    entry = (marker or {}).get("entry")
    if not entry or not Path(entry).is_dir():
        yield None
        return
    held = node_cache.hold(Path(entry))
    try:
        yield held
    finally:
        held.close()
