"""The node model cache against the loopback S3 server: a warm fetch makes no request at all,
concurrent pods of a node download once, --refresh picks up a new revision, and LRU eviction
to the size limit skips entries a running process holds."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge.devcluster.s3server import S3Server
from lmforge.runtime.storage import cache as node_cache
from lmforge.runtime.storage.cache import NodeCache
from lmforge.runtime.storage.transfer import fetch, holding, upload


def quiet(payload: object, line: str) -> None:
    pass


@pytest.fixture
def model_uri(
    s3_env: dict[str, str], s3_server: S3Server, tmp_path: Path, request: pytest.FixtureRequest
) -> str:
    bucket = f"cache-{abs(hash(request.node.name)) % 10**8}"
    s3_server.create_bucket(bucket)
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "llama"}')
    (src / "model.safetensors").write_bytes(os.urandom(200_000))
    upload(src, f"s3://{bucket}/tiny", report=quiet)
    return f"s3://{bucket}/tiny"


def test_warm_fetch_touches_no_network(
    model_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = NodeCache(tmp_path / "cache")
    cold = fetch(model_uri, tmp_path / "pod-1", cache=cache, report=quiet)
    assert (cold.cached, cold.bytes) == (False, 200_000 + len('{"model_type": "llama"}'))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: any request fails
    warm = fetch(model_uri, tmp_path / "pod-2", cache=cache, report=quiet)
    assert (warm.cached, warm.bytes, warm.revision, warm.entry) == (True, 0, cold.revision, cold.entry)
    pod2 = tmp_path / "pod-2" / "model.safetensors"
    assert pod2.is_symlink() and pod2.read_bytes() == (tmp_path / "pod-1" / "model.safetensors").read_bytes()
    assert len(cache.entries()) == 1


def test_refresh_fetches_a_new_revision(model_uri: str, s3_server: S3Server, tmp_path: Path) -> None:
    cache = NodeCache(tmp_path / "cache")
    first = fetch(model_uri, tmp_path / "a", cache=cache, report=quiet)
    bucket = model_uri.split("/")[2]
    s3_server.client().put_object(Bucket=bucket, Key="tiny/config.json", Body=b'{"model_type": "qwen3"}')
    stale = fetch(model_uri, tmp_path / "b", cache=cache, report=quiet)
    assert stale.revision == first.revision  # no refresh: the cached revision, no request
    s3_server.client().delete_object(Bucket=bucket, Key="tiny/.lmforge-manifest.json")  # plain objects now
    fresh = fetch(model_uri, tmp_path / "c", cache=cache, refresh=True, report=quiet)
    assert fresh.revision != first.revision and not fresh.cached
    assert (tmp_path / "c" / "config.json").read_text() == '{"model_type": "qwen3"}'
    assert cache.lookup(model_uri).revision == fresh.revision  # type: ignore[union-attr]


def test_pods_of_a_node_download_once(model_uri: str, s3_env: dict[str, str], tmp_path: Path) -> None:
    env = {**os.environ, **s3_env}
    cmd = [sys.executable, "-P", "-m", "lmforge.cli", "fetch", model_uri]
    procs = [
        subprocess.Popen(
            [*cmd, str(tmp_path / f"pod-{i}"), "--cache-dir", str(tmp_path / "cache")],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    logs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], logs
    assert sum("bytes downloaded" in log for log in logs) == 1, logs
    assert sum("from the node cache" in log for log in logs) == 2, logs
    assert len(NodeCache(tmp_path / "cache").entries()) == 1


def make_entry(cache: NodeCache, uri: str, size: int, age_s: float) -> node_cache.Entry:
    path = cache.entry_dir(uri, "r1")
    (path / "data").mkdir(parents=True)
    (path / "data" / "w.bin").write_bytes(b"x" * size)
    entry = cache.commit(uri, "r1", size)
    stamp = time.time() - age_s
    os.utime(path / node_cache.LAST_USED, (stamp, stamp))
    return entry


def test_lru_eviction_skips_entries_in_use(tmp_path: Path) -> None:
    unlimited = NodeCache(tmp_path / "cache")
    make_entry(unlimited, "s3://bkt/oldest", 100, age_s=3000)
    held_entry = make_entry(unlimited, "s3://bkt/held", 100, age_s=2000)
    recent = make_entry(unlimited, "s3://bkt/recent", 100, age_s=30)  # inside the grace window
    cache = NodeCache(tmp_path / "cache", max_bytes=250, grace_s=60)
    held = node_cache.hold(held_entry.path)  # a running server
    os.utime(held_entry.path / node_cache.LAST_USED, (time.time() - 2000,) * 2)
    try:
        make_entry(cache, "s3://bkt/new", 100, age_s=0)  # 400 bytes: evict down to 250
        assert sorted(e.uri for e in cache.entries()) == ["s3://bkt/held", "s3://bkt/new", "s3://bkt/recent"]
        assert cache.lookup("s3://bkt/oldest") is None
    finally:
        held.close()
    os.utime(recent.path / node_cache.LAST_USED, (time.time() - 1000,) * 2)
    removed = cache.evict()  # nothing holds `held` now: the least recently used goes first
    assert [e.uri for e in removed] == ["s3://bkt/held"]
    assert sorted(e.uri for e in cache.entries()) == ["s3://bkt/new", "s3://bkt/recent"]


def test_the_server_holds_its_entry(model_uri: str, tmp_path: Path) -> None:
    cache = NodeCache(tmp_path / "cache", max_bytes=1, grace_s=0)
    result = fetch(model_uri, tmp_path / "pod", cache=cache, report=quiet)
    with holding(tmp_path / "pod") as held:
        assert held is not None
        assert cache.evict() == []
    assert [e.path.as_posix() for e in cache.evict()] == [result.entry]


def test_a_restarted_pod_relinks_when_its_entry_was_evicted(model_uri: str, tmp_path: Path) -> None:
    cache = NodeCache(tmp_path / "cache", max_bytes=1, grace_s=0)
    first = fetch(model_uri, tmp_path / "pod", cache=cache, report=quiet)
    again = fetch(model_uri, tmp_path / "pod", cache=cache, report=quiet)  # restart: the marker says done
    assert (again.cached, again.bytes) == (True, 0)
    assert [e.path.as_posix() for e in cache.evict()] == [first.entry]  # nobody held it
    refetched = fetch(model_uri, tmp_path / "pod", cache=cache, report=quiet)
    assert (
        not refetched.cached and (tmp_path / "pod" / "config.json").read_text() == '{"model_type": "llama"}'
    )
