"""s3://bucket/prefix through boto3: listing, parallel ranged download with resume and
verification, multipart upload of a directory with a manifest written last.

Configuration is the standard AWS environment (in a pod: `spec.env`, usually Secret refs):
AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) for MinIO / Ceph / any S3-compatible store,
AWS_REGION / AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN
(or any other boto3 credential source). AWS_S3_ADDRESSING_STYLE picks path or virtual hosting
(default: path when an endpoint is set, as MinIO needs).

Download of one object (`download_object`):
    <dst>.part          the object's bytes, written in place by ranged GETs (If-Match: its ETag)
    <dst>.part.json     {etag, size, chunkBytes}: what the .part file belongs to
    <dst>.part.done     one chunk index per line, appended after the chunk is on disk (fsync)
A killed download resumes from the chunks listed; a changed object (other ETag or size) starts
over. The file is renamed to <dst> only after its size and checksum are verified: the sha256 of
the manifest when the prefix has one, else the MD5 of a single-part ETag, else the size.

Upload of a directory (`upload_dir`): the old manifest is deleted first, every file is uploaded
(multipart above `chunk_bytes`, `workers` parts at once), then `.lmforge-manifest.json` is
written: a prefix with a manifest is complete, as the local checkpoints' trainer_state.json.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.runtime.storage.uri import StorageURI, parse

MANIFEST = ".lmforge-manifest.json"
CHUNK_BYTES_ENV = "LMFORGE_S3_CHUNK_BYTES"
WORKERS_ENV = "LMFORGE_S3_WORKERS"
DEFAULT_CHUNK_BYTES = 16 * 1024 * 1024
DEFAULT_WORKERS = 8
_READ_BYTES = 1024 * 1024
_AUTH_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "InvalidToken",
    "ExpiredToken",
    "AuthorizationHeaderMalformed",
    "403",
}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


class StorageError(RuntimeError):
    """A transfer failed; the message names the URI (and the bucket for access errors)."""


@dataclass(frozen=True, slots=True)
class S3Object:
    key: str
    size: int
    etag: str  # without quotes


@dataclass(frozen=True, slots=True)
class Listing:
    """What a download of the URI fetches: relative path -> object, and the manifest's entries
    ({size, sha256}) when the prefix has one."""

    uri: str
    files: dict[str, S3Object]
    manifest: dict[str, dict[str, Any]] | None

    @property
    def total_bytes(self) -> int:
        return sum(o.size for o in self.files.values())

    @property
    def revision(self) -> str:
        """Changes whenever any object changes: the node cache's key."""
        digest = hashlib.sha256()
        for rel in sorted(self.files):
            obj = self.files[rel]
            digest.update(f"{rel}\0{obj.size}\0{obj.etag}\n".encode())
        return digest.hexdigest()[:16]


def settings(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(chunk bytes, parallel workers) from LMFORGE_S3_CHUNK_BYTES / LMFORGE_S3_WORKERS."""
    env = os.environ if env is None else env
    values = []
    for name, default, low in (
        (CHUNK_BYTES_ENV, DEFAULT_CHUNK_BYTES, 5 * 1024),
        (WORKERS_ENV, DEFAULT_WORKERS, 1),
    ):
        raw = env.get(name)
        try:
            value = int(raw) if raw else default
        except ValueError:
            raise StorageError(f"{name}={raw!r}: must be an integer") from None
        if value < low:
            raise StorageError(f"{name}={raw!r}: must be at least {low}")
        values.append(value)
    return values[0], values[1]


def client(env: Mapping[str, str] | None = None, workers: int = DEFAULT_WORKERS) -> Any:
    import boto3
    from botocore.config import Config

    env = os.environ if env is None else env
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
    style = env.get("AWS_S3_ADDRESSING_STYLE") or ("path" if endpoint else "auto")
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
    config = Config(
        retries={"max_attempts": 5, "mode": "standard"},
        max_pool_connections=workers + 2,
        s3={"addressing_style": style},
        connect_timeout=10,
        read_timeout=60,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region, config=config)


def describe_error(exc: BaseException, uri: StorageURI, action: str) -> StorageError:
    """One message per failure kind, naming the URI; access errors name the bucket and the
    variables that hold credentials."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return StorageError(
            f"cannot {action} {uri.uri}: no credentials for bucket {uri.bucket!r} "
            "(set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, e.g. from a Secret in spec.env)"
        )
    if isinstance(exc, EndpointConnectionError):
        return StorageError(f"cannot {action} {uri.uri}: cannot reach the S3 endpoint ({exc})")
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _AUTH_CODES or status == 403:
            return StorageError(
                f"cannot {action} {uri.uri}: access denied to bucket {uri.bucket!r} ({code}: "
                f"{error.get('Message', '')}); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the "
                "bucket policy"
            )
        if code == "NoSuchBucket":
            return StorageError(f"cannot {action} {uri.uri}: bucket {uri.bucket!r} does not exist")
        if code in _MISSING_CODES:
            return StorageError(f"cannot {action} {uri.uri}: no such object")
        return StorageError(f"cannot {action} {uri.uri}: {code or status}: {error.get('Message', exc)}")
    if isinstance(exc, StorageError):
        return exc
    return StorageError(f"cannot {action} {uri.uri}: {type(exc).__name__}: {exc}")


def _guarded(uri: StorageURI, action: str, call: Callable[[], Any]) -> Any:
    try:
        return call()
    except StorageError:
        raise
    except Exception as exc:  # botocore's many error types -> one message naming the URI
        raise describe_error(exc, uri, action) from exc


# --- listing ----------------------------------------------------------------------------------------


def _objects(s3: Any, bucket: str, prefix: str) -> Iterator[S3Object]:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents") or ():
            yield S3Object(item["Key"], int(item["Size"]), item["ETag"].strip('"'))


def list_uri(s3: Any, uri: str) -> Listing:
    """The objects under s3://bucket/prefix/ (or the one object the URI names). A missing prefix,
    an empty one, or a bucket we may not read is a StorageError naming the URI."""
    parsed = parse(uri)

    def run() -> Listing:
        prefix = parsed.key
        found = {
            o.key[len(prefix) + 1 :]: o for o in _objects(s3, parsed.bucket, f"{prefix}/" if prefix else "")
        }
        found = {rel: o for rel, o in found.items() if rel and not rel.endswith("/")}
        if not found and prefix:  # the URI may name one object
            try:
                head = s3.head_object(Bucket=parsed.bucket, Key=prefix)
            except Exception as exc:
                error = describe_error(exc, parsed, "download")
                if "no such object" in str(error):
                    raise StorageError(f"cannot download {uri}: no such object or prefix") from exc
                raise error from exc
            obj = S3Object(prefix, int(head["ContentLength"]), head["ETag"].strip('"'))
            return Listing(uri, {prefix.rsplit("/", 1)[-1]: obj}, None)
        if not found:
            raise StorageError(f"cannot download {uri}: the bucket is empty")
        manifest = None
        if MANIFEST in found:
            body = s3.get_object(Bucket=parsed.bucket, Key=found.pop(MANIFEST).key)["Body"].read()
            manifest = json.loads(body)["files"]
            missing = sorted(set(manifest) - set(found))
            if missing:
                raise StorageError(f"cannot download {uri}: its manifest lists missing objects {missing[:5]}")
            found = {rel: found[rel] for rel in manifest}  # extra objects: a newer upload in progress
        return Listing(uri, found, manifest)

    return _guarded(parsed, "download", run)


# --- download ---------------------------------------------------------------------------------------


def _verify(path: Path, obj: S3Object, expected: Mapping[str, Any] | None, uri: str) -> None:
    size = path.stat().st_size
    if size != obj.size or (expected is not None and size != expected.get("size")):
        raise StorageError(f"{uri}: downloaded {size} bytes, expected {obj.size}")
    if expected is not None and expected.get("sha256"):
        digest = file_digest(path, "sha256")
        if digest != expected["sha256"]:
            raise StorageError(f"{uri}: sha256 {digest} does not match the manifest's {expected['sha256']}")
    elif "-" not in obj.etag and len(obj.etag) == 32:  # single-part upload: the ETag is the MD5
        digest = file_digest(path, "md5")
        if digest != obj.etag:
            raise StorageError(f"{uri}: MD5 {digest} does not match the ETag {obj.etag}")


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(_READ_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _resume_state(part: Path, obj: S3Object, chunk_bytes: int) -> set[int]:
    """Chunk indices already on disk for this very object (empty if the object changed)."""
    state_file, done_file = Path(f"{part}.json"), Path(f"{part}.done")
    want = {"etag": obj.etag, "size": obj.size, "chunkBytes": chunk_bytes}
    try:
        if json.loads(state_file.read_text()) == want and part.stat().st_size == obj.size:
            return {int(line) for line in done_file.read_text().split()}
    except (OSError, ValueError):
        pass
    for stale in (part, done_file):
        stale.unlink(missing_ok=True)
    state_file.write_text(json.dumps(want))
    return set()


def download_object(
    s3: Any,
    bucket: str,
    obj: S3Object,
    dst: Path,
    *,
    chunk_bytes: int,
    workers: int,
    expected: Mapping[str, Any] | None = None,
    on_bytes: Callable[[int], None] = lambda n: None,
    pool: ThreadPoolExecutor | None = None,
) -> int:
    """Download one object to `dst` (resuming a killed earlier attempt); returns the bytes fetched now."""
    uri = f"s3://{bucket}/{obj.key}"
    dst.parent.mkdir(parents=True, exist_ok=True)
    part = dst.with_name(dst.name + ".part")
    done = _resume_state(part, obj, chunk_bytes)
    num_chunks = max(1, math.ceil(obj.size / chunk_bytes))
    todo = [i for i in range(num_chunks) if i not in done]
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
    lock = threading.Lock()
    fetched = 0
    try:
        os.ftruncate(fd, obj.size)
        for i in done:
            on_bytes(min(chunk_bytes, obj.size - i * chunk_bytes))
        done_log = open(f"{part}.done", "a")  # noqa: SIM115 - closed below

        def fetch(index: int) -> None:
            nonlocal fetched
            if obj.size == 0:
                return
            start = index * chunk_bytes
            end = min(obj.size, start + chunk_bytes) - 1
            body = s3.get_object(
                Bucket=bucket, Key=obj.key, Range=f"bytes={start}-{end}", IfMatch=f'"{obj.etag}"'
            )["Body"]
            offset = start
            while block := body.read(_READ_BYTES):
                os.pwrite(fd, block, offset)
                offset += len(block)
                on_bytes(len(block))
            if offset != end + 1:
                raise StorageError(f"{uri}: short read of bytes {start}-{end} (got {offset - start})")
            os.fsync(fd)
            with lock:
                fetched += offset - start
                done_log.write(f"{index}\n")
                done_log.flush()

        try:
            if pool is None or workers <= 1 or len(todo) <= 1:
                for index in todo:
                    fetch(index)
            else:
                for future in [pool.submit(fetch, i) for i in todo]:
                    future.result()
        finally:
            done_log.close()
    finally:
        os.close(fd)
    _verify(part, obj, expected, uri)
    part.replace(dst)
    for leftover in (Path(f"{part}.json"), Path(f"{part}.done")):
        leftover.unlink(missing_ok=True)
    return fetched


def download(
    s3: Any,
    listing: Listing,
    dst: Path,
    *,
    chunk_bytes: int,
    workers: int,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> int:
    """Every file of the listing into `dst` (files already complete there are verified by size
    and kept); returns the bytes fetched over the network."""
    parsed = parse(listing.uri)
    fetched = 0

    def run() -> int:
        nonlocal fetched
        # chunks of all files share one pool: a directory of many small files is as parallel as one big file
        with (
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="s3-get") as chunks,
            ThreadPoolExecutor(max_workers=max(1, min(4, workers)), thread_name_prefix="s3-file") as files,
        ):

            def one(rel: str) -> int:
                obj, target = listing.files[rel], dst / rel
                expected = (listing.manifest or {}).get(rel)
                if target.is_file() and target.stat().st_size == obj.size:
                    on_bytes(obj.size)
                    return 0
                return download_object(
                    s3, parsed.bucket, obj, target, chunk_bytes=chunk_bytes, workers=workers,
                    expected=expected, on_bytes=on_bytes, pool=chunks,
                )  # fmt: skip

            for future in [files.submit(one, rel) for rel in sorted(listing.files)]:
                fetched += future.result()
        return fetched

    return _guarded(parsed, "download", run)


# --- upload -----------------------------------------------------------------------------------------


def local_files(root: Path) -> dict[str, Path]:
    """Relative path -> file, for every regular file below `root` (partial downloads excluded)."""
    if root.is_file():
        return {root.name: root}
    return {
        p.relative_to(root).as_posix(): p
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST and not p.name.endswith((".part", ".part.json", ".part.done"))
    }


def upload_dir(
    s3: Any,
    src: Path,
    uri: str,
    *,
    chunk_bytes: int,
    workers: int,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> dict[str, dict[str, Any]]:
    """Upload `src` (a directory, or one file) under s3://bucket/prefix/ and write the manifest
    last; returns the manifest's files."""
    from boto3.s3.transfer import TransferConfig

    parsed = parse(uri)
    if parsed.scheme != "s3":
        raise StorageError(f"{uri}: not an s3:// URI")
    files = local_files(src)
    if not files:
        raise StorageError(f"cannot upload {src} to {uri}: no files")
    config = TransferConfig(
        multipart_threshold=chunk_bytes,
        multipart_chunksize=chunk_bytes,
        max_concurrency=workers,
        use_threads=True,
    )

    def key(rel: str) -> str:
        return f"{parsed.key}/{rel}" if parsed.key else rel

    def run() -> dict[str, dict[str, Any]]:
        s3.delete_object(
            Bucket=parsed.bucket, Key=key(MANIFEST)
        )  # readers never pair the old manifest with new files
        manifest: dict[str, dict[str, Any]] = {}
        for rel, path in files.items():
            manifest[rel] = {"size": path.stat().st_size, "sha256": file_digest(path, "sha256")}
            s3.upload_file(str(path), parsed.bucket, key(rel), Config=config, Callback=on_bytes)
        body = json.dumps({"version": 1, "files": manifest}, indent=1, sort_keys=True).encode()
        s3.put_object(Bucket=parsed.bucket, Key=key(MANIFEST), Body=body, ContentType="application/json")
        return manifest

    return _guarded(parsed, "upload to", run)
