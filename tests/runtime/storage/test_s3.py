"""The S3 backend and fetch/upload against a real S3 API server on loopback (moto server mode):
round trip with the manifest, parallel chunked download, a download killed and resumed, a changed
object restarting, wrong credentials and missing keys, and `lmforge fetch` as a process."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.devcluster.s3server import S3Server
from lmforge.runtime.storage import s3
from lmforge.runtime.storage.transfer import MARKER, fetch, upload


def write_model(root: Path, seed: int = 0) -> dict[str, bytes]:
    """A directory of 'weights' with sizes around the chunk size (64 KiB in these tests)."""
    files = {
        "config.json": json.dumps({"model_type": "llama", "seed": seed}).encode(),
        "model.safetensors": os.urandom(300 * 1024 + 17),
        "tokenizer/tokenizer.json": os.urandom(64 * 1024),
        "empty.txt": b"",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.name != MARKER
    }


def count_gets(client: object) -> list[str]:
    """The Range header of every GetObject the client sends."""
    ranges: list[str] = []
    client.meta.events.register(  # type: ignore[attr-defined]
        "before-call.s3.GetObject",
        lambda params, **kw: ranges.append(params.get("headers", {}).get("Range", "")),
    )
    return ranges


@pytest.fixture
def bucket(s3_server: S3Server, request: pytest.FixtureRequest) -> str:
    name = "b-" + hashlib.sha1(request.node.name.encode()).hexdigest()[:12]
    s3_server.create_bucket(name)
    return name


def test_round_trip_with_manifest(
    s3_env: dict[str, str], s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    files = write_model(tmp_path / "src")
    manifest = upload(tmp_path / "src", f"s3://{bucket}/models/tiny")
    assert manifest["model.safetensors"] == {
        "size": len(files["model.safetensors"]),
        "sha256": hashlib.sha256(files["model.safetensors"]).hexdigest(),
    }
    keys = sorted(o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == sorted([f"models/tiny/{rel}" for rel in files] + ["models/tiny/.lmforge-manifest.json"])

    lines: list[str] = []
    result = fetch(
        f"s3://{bucket}/models/tiny", tmp_path / "dst", report=lambda payload, line: lines.append(line)
    )
    assert tree(tmp_path / "dst") == files
    assert (result.cached, result.bytes) == (False, sum(len(b) for b in files.values()))
    assert json.loads((tmp_path / "dst" / MARKER).read_text())["uri"] == f"s3://{bucket}/models/tiny"
    assert not list((tmp_path / "dst").rglob("*.part*"))
    assert "downloaded" in lines[-1]


def test_multipart_upload_and_parallel_ranged_download(
    s3_env: dict[str, str], s3_server: S3Server, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LMFORGE_S3_CHUNK_BYTES", str(5 * 1024 * 1024))  # S3's smallest multipart part
    data = os.urandom(11 * 1024 * 1024 + 5)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "w.bin").write_bytes(data)
    upload(tmp_path / "src", f"s3://{bucket}/big")
    etag = s3_server.client().head_object(Bucket=bucket, Key="big/w.bin")["ETag"].strip('"')
    assert etag.endswith("-3")  # a multipart upload: 5 + 5 + 1 MiB parts

    client = s3.client(s3_env, workers=4)
    ranges = count_gets(client)
    listing = s3.list_uri(client, f"s3://{bucket}/big")
    s3.download(client, listing, tmp_path / "dst", chunk_bytes=4 * 1024 * 1024, workers=4)
    assert (tmp_path / "dst" / "w.bin").read_bytes() == data  # verified against the manifest's sha256
    assert sorted(r for r in ranges if r) == sorted(
        ["bytes=0-4194303", "bytes=4194304-8388607", f"bytes=8388608-{len(data) - 1}"]
    )


def test_interrupted_download_resumes_from_the_chunks_on_disk(
    s3_env: dict[str, str], bucket: str, tmp_path: Path
) -> None:
    files = write_model(tmp_path / "src")
    upload(tmp_path / "src", f"s3://{bucket}/m")
    size = len(files["model.safetensors"])
    client = s3.client(s3_env, workers=1)
    listing = s3.list_uri(client, f"s3://{bucket}/m")
    obj = listing.files["model.safetensors"]
    dst = tmp_path / "dst" / "model.safetensors"
    chunk = 64 * 1024

    seen = 0

    def crash_after_two_chunks(n: int) -> None:
        nonlocal seen
        seen += n
        if seen > 2 * chunk:
            raise KeyboardInterrupt  # the process is killed mid-transfer

    with pytest.raises(KeyboardInterrupt):
        s3.download_object(
            client,
            listing.uri.split("//")[1].split("/")[0],
            obj,
            dst,
            chunk_bytes=chunk,
            workers=1,
            on_bytes=crash_after_two_chunks,
        )
    assert not dst.exists()
    assert Path(f"{dst}.part.done").read_text().split() == ["0", "1"]

    ranges = count_gets(client)
    fetched = s3.download_object(
        client, bucket, obj, dst, chunk_bytes=chunk, workers=1, expected=listing.manifest["model.safetensors"]
    )
    assert dst.read_bytes() == files["model.safetensors"]
    assert fetched == size - 2 * chunk
    assert ranges == [f"bytes={i * chunk}-{min(size, (i + 1) * chunk) - 1}" for i in range(2, 5)]
    assert not Path(f"{dst}.part.done").exists()


def test_a_changed_object_restarts_the_download(
    s3_env: dict[str, str], s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    client = s3.client(s3_env, workers=1)
    s3_server.client().put_object(Bucket=bucket, Key="x/a.bin", Body=b"A" * 200_000)
    obj = s3.list_uri(client, f"s3://{bucket}/x").files["a.bin"]
    dst = tmp_path / "a.bin"
    with pytest.raises(KeyboardInterrupt):
        s3.download_object(
            client,
            bucket,
            obj,
            dst,
            chunk_bytes=65536,
            workers=1,
            on_bytes=lambda n: (_ for _ in ()).throw(KeyboardInterrupt),
        )
    s3_server.client().put_object(Bucket=bucket, Key="x/a.bin", Body=b"B" * 200_000)
    new = s3.list_uri(client, f"s3://{bucket}/x").files["a.bin"]
    assert new.etag != obj.etag
    s3.download_object(client, bucket, new, dst, chunk_bytes=65536, workers=1)
    assert dst.read_bytes() == b"B" * 200_000  # no A chunk kept: verified against the single-part MD5 ETag


def test_corrupt_bytes_fail_verification(
    s3_env: dict[str, str], s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    files = write_model(tmp_path / "src")
    upload(tmp_path / "src", f"s3://{bucket}/m")
    s3_server.client().put_object(
        Bucket=bucket, Key="m/config.json", Body=b"x" * len(files["config.json"])
    )  # same size, other bytes
    with pytest.raises(
        s3.StorageError, match=r"s3://.*/m/config.json: sha256 \w+ does not match the manifest"
    ):
        fetch(f"s3://{bucket}/m", tmp_path / "dst", report=lambda p, line: None)


def test_wrong_credentials_name_the_bucket(
    s3_env: dict[str, str], bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moto import settings

    monkeypatch.setattr(
        settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0
    )  # the server checks signatures from now on
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    with pytest.raises(
        s3.StorageError,
        match=rf"cannot download s3://{bucket}/m: access denied to bucket '{bucket}' \(InvalidAccessKeyId.*AWS_ACCESS_KEY_ID",
    ):
        fetch(f"s3://{bucket}/m", tmp_path / "dst", report=lambda p, line: None)


def test_missing_key_and_bucket(s3_env: dict[str, str], bucket: str, tmp_path: Path) -> None:
    with pytest.raises(
        s3.StorageError, match=rf"cannot download s3://{bucket}/nope: no such object or prefix"
    ):
        fetch(f"s3://{bucket}/nope", tmp_path / "a", report=lambda p, line: None)
    with pytest.raises(s3.StorageError, match="bucket 'no-such-bucket-x' does not exist"):
        fetch("s3://no-such-bucket-x/m", tmp_path / "b", report=lambda p, line: None)


def test_a_single_object_uri(
    s3_env: dict[str, str], s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    s3_server.client().put_object(Bucket=bucket, Key="data/train.jsonl", Body=b'{"text": "hi"}\n')
    fetch(f"s3://{bucket}/data/train.jsonl", tmp_path / "d", report=lambda p, line: None)
    assert (tmp_path / "d" / "train.jsonl").read_bytes() == b'{"text": "hi"}\n'


def test_a_partial_upload_is_never_read_as_complete(
    s3_env: dict[str, str], s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """Files of a newer upload without its manifest yet: readers get the manifest's files only."""
    write_model(tmp_path / "src")
    upload(tmp_path / "src", f"s3://{bucket}/m")
    s3_server.client().put_object(Bucket=bucket, Key="m/extra-from-a-newer-upload.bin", Body=b"half")
    fetch(f"s3://{bucket}/m", tmp_path / "dst", report=lambda p, line: None)
    assert not (tmp_path / "dst" / "extra-from-a-newer-upload.bin").exists()


def test_lmforge_fetch_process_exit_codes(s3_env: dict[str, str], bucket: str, tmp_path: Path) -> None:
    files = write_model(tmp_path / "src")
    upload(tmp_path / "src", f"s3://{bucket}/m")
    env = {**os.environ, **s3_env}
    lmforge = [sys.executable, "-P", "-m", "lmforge.cli"]
    ok = subprocess.run(
        [*lmforge, "fetch", f"s3://{bucket}/m", str(tmp_path / "dst")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert tree(tmp_path / "dst") == files
    assert f"[lmforge.fetch] s3://{bucket}/m -> {tmp_path / 'dst'}:" in ok.stderr
    missing = subprocess.run(
        [*lmforge, "fetch", f"s3://{bucket}/gone", str(tmp_path / "x")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (missing.returncode, missing.stderr.strip()) == (
        1,
        f"lmforge fetch: cannot download s3://{bucket}/gone: no such object or prefix",
    )
    bad = subprocess.run(
        [*lmforge, "fetch", "gs://x/y", str(tmp_path / "y")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "unsupported scheme gs://" in bad.stderr


def test_lmforge_fetch_killed_mid_download_resumes(
    s3_env: dict[str, str], s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """A real kill -9 of the storage initializer: the next run fetches only what is missing."""
    import signal
    import time

    data = os.urandom(4 * 1024 * 1024)
    s3_server.client().put_object(Bucket=bucket, Key="big/w.bin", Body=data)
    env = {**os.environ, **s3_env, "LMFORGE_S3_WORKERS": "1", "LMFORGE_S3_CHUNK_BYTES": str(64 * 1024)}
    cmd = [sys.executable, "-P", "-m", "lmforge.cli", "fetch", f"s3://{bucket}/big", str(tmp_path / "dst")]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    done_log = tmp_path / "dst" / "w.bin.part.done"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if done_log.exists() and len(done_log.read_text().split()) >= 8:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the download finished before it could be killed"
    chunks_on_disk = len(set(done_log.read_text().split()))
    assert 8 <= chunks_on_disk < 64

    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert (tmp_path / "dst" / "w.bin").read_bytes() == data  # verified against the MD5 ETag
    assert f"{len(data) - chunks_on_disk * 64 * 1024} bytes downloaded" in resumed.stderr
