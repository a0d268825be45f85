"""The node model cache: one directory per node (a hostPath or node-local PVC, set in the Helm
values) that every pod on the node shares, so ten replicas download a model once and a scale-up
of a cached model never touches the network.

    <root>/index/<hash(uri)>.json        {uri, revision, entry}: the revision last fetched for a URI
    <root>/entries/<hash(uri@revision)>/
        data/...                        the files (downloads resume here after a kill)
        entry.json                      {uri, revision, bytes}: written last, the entry is complete
        in-use.lock                     flock: shared while a pod uses the entry, exclusive to evict
        last-used                       its mtime is the LRU clock
    <root>/locks/<hash(uri)>.lock       one download per URI at a time (the others wait, then hit)
    <root>/cache.lock                   held while entries are committed or evicted

Keyed by URI + revision (S3: a digest of the objects' ETags and sizes; hf: the commit sha). A URI
whose index points at a complete entry is served without any request (`lookup`); `refresh` asks
the remote for its current revision first. Eviction (least recently used first) removes only
entries that no process holds a shared lock on and that were not used within `grace_s` (the
window between an init container's exit and its pod's server taking the lock).

Locks are fcntl.flock on files in the cache: released by the kernel when a process dies, and
shared between containers of one node because they are the same host files.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ENTRY_FILE = "entry.json"
IN_USE = "in-use.lock"
LAST_USED = "last-used"
DEFAULT_GRACE_S = 600.0


def key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass(frozen=True, slots=True)
class Entry:
    path: Path  # entries/<key>
    uri: str
    revision: str
    bytes: int

    @property
    def data(self) -> Path:
        return self.path / "data"


@contextlib.contextmanager
def flocked(path: Path, mode: int = fcntl.LOCK_EX) -> Iterator[IO[bytes]]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        fcntl.flock(f, mode)
        try:
            yield f
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def hold(entry_dir: Path) -> IO[bytes]:
    """A shared lock on the entry for as long as the returned file stays open (the server keeps it
    for its lifetime): eviction skips the entry meanwhile."""
    f = open(entry_dir / IN_USE, "ab")  # noqa: SIM115 - the caller keeps it open on purpose
    fcntl.flock(f, fcntl.LOCK_SH)
    (entry_dir / LAST_USED).touch()
    return f


class NodeCache:
    def __init__(self, root: Path, max_bytes: int | None = None, grace_s: float = DEFAULT_GRACE_S) -> None:
        self.root, self.max_bytes, self.grace_s = Path(root), max_bytes, grace_s

    # --- paths -------------------------------------------------------------------------------------
    def entry_dir(self, uri: str, revision: str) -> Path:
        return self.root / "entries" / key(f"{uri}@{revision}")

    def _index(self, uri: str) -> Path:
        return self.root / "index" / f"{key(uri)}.json"

    def uri_lock(self, uri: str) -> Path:
        return self.root / "locks" / f"{key(uri)}.lock"

    # --- reads -------------------------------------------------------------------------------------
    @staticmethod
    def read_entry(path: Path) -> Entry | None:
        try:
            meta = json.loads((path / ENTRY_FILE).read_text())
            return Entry(path, meta["uri"], meta["revision"], int(meta["bytes"]))
        except (OSError, ValueError, KeyError):
            return None

    def lookup(self, uri: str) -> Entry | None:
        """The complete entry last fetched for `uri`, without any network request."""
        try:
            index = json.loads(self._index(uri).read_text())
        except (OSError, ValueError):
            return None
        entry = self.read_entry(self.root / "entries" / str(index.get("entry", "")))
        return entry if entry is not None and entry.uri == uri else None

    def get(self, uri: str, revision: str) -> Entry | None:
        entry = self.read_entry(self.entry_dir(uri, revision))
        return entry if entry is not None and entry.uri == uri else None

    def entries(self) -> list[Entry]:
        found = []
        for path in sorted((self.root / "entries").glob("*")):
            entry = self.read_entry(path)
            if entry is not None:
                found.append(entry)
        return found

    # --- writes ------------------------------------------------------------------------------------
    def commit(self, uri: str, revision: str, num_bytes: int) -> Entry:
        """Mark entry_dir(uri, revision) complete (its data/ is written), point the URI at it and
        evict to the size limit."""
        path = self.entry_dir(uri, revision)
        with flocked(self.root / "cache.lock"):
            tmp = path / f".{ENTRY_FILE}.tmp"
            tmp.write_text(json.dumps({"uri": uri, "revision": revision, "bytes": num_bytes}))
            tmp.replace(path / ENTRY_FILE)
            (path / LAST_USED).touch()
            index = self._index(uri)
            index.parent.mkdir(parents=True, exist_ok=True)
            tmp_index = index.with_name(index.name + ".tmp")
            tmp_index.write_text(json.dumps({"uri": uri, "revision": revision, "entry": path.name}))
            tmp_index.replace(index)
            self._evict(keep=path)
        entry = self.read_entry(path)
        assert entry is not None
        return entry

    def touch(self, entry: Entry) -> None:
        (entry.path / LAST_USED).touch()

    def evict(self) -> list[Entry]:
        with flocked(self.root / "cache.lock"):
            return self._evict(keep=None)

    def _evict(self, keep: Path | None) -> list[Entry]:
        """Least recently used first, until the complete entries fit `max_bytes`."""
        if self.max_bytes is None:
            return []
        entries = self.entries()
        total = sum(e.bytes for e in entries)
        removed: list[Entry] = []

        def last_used(entry: Entry) -> float:
            try:
                return (entry.path / LAST_USED).stat().st_mtime
            except OSError:
                return 0.0

        for entry in sorted(entries, key=last_used):
            if total <= self.max_bytes:
                break
            if entry.path == keep or time.time() - last_used(entry) < self.grace_s:
                continue
            if self._remove_unused(entry):
                total -= entry.bytes
                removed.append(entry)
        return removed

    def _remove_unused(self, entry: Entry) -> bool:
        """Remove the entry unless a process holds it (non-blocking exclusive lock)."""
        with open(entry.path / IN_USE, "ab") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            (entry.path / ENTRY_FILE).unlink(missing_ok=True)  # incomplete from now on
            trash = self.root / "trash" / f"{entry.path.name}-{os.getpid()}-{time.monotonic_ns()}"
            trash.parent.mkdir(parents=True, exist_ok=True)
            entry.path.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
        return True


def link_tree(src: Path, dst: Path) -> None:
    """dst/<rel> -> src/<rel> symlinks for every file (dst is the pod's model directory, src an
    entry on the cache volume, mounted at the same path in every container of the pod)."""
    for path in sorted(src.rglob("*")):
        if not path.is_file() or path.relative_to(src).parts[0] == ".cache":  # huggingface_hub's resume state
            continue
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        target.symlink_to(path)


def describe(entry: Entry) -> dict[str, Any]:
    return {"uri": entry.uri, "revision": entry.revision, "bytes": entry.bytes, "path": str(entry.path)}
