"""hf://org/name -> a local snapshot directory, downloaded with `huggingface_hub.snapshot_download`.

Used by the TrainJob worker (model and dataset) and the quantizer (model); the server hands
`org/name` to transformers, which downloads it itself.

    resolve("hf://meta-llama/Llama-3.2-1B")                    # -> <cache>/models--meta-llama--Llama-3.2-1B/snapshots/<sha>
    resolve("hf://me/chat-data", repo_type="dataset")          # only its *.jsonl files

Cache: $HF_HUB_CACHE, else $HF_HOME/hub, else /tmp/lmforge-hub (pods often have a read-only home
directory; /tmp is writable, and an emptyDir or PVC mounted at $HF_HOME keeps the download across
container restarts). HF_TOKEN (gated or private repos) and HF_ENDPOINT (a mirror) are honoured; in a
TrainJob they are set through `spec.env`.

Several processes of one node (torchrun's local ranks) may resolve the same URI at once: a file
lock in the cache directory lets one download while the others wait, after which they find every
file cached and only re-check the revision (one small API request each), so the files are fetched
once per node and every rank gets the same snapshot.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

HF_SCHEME = "hf://"
DEFAULT_CACHE_DIR = "/tmp/lmforge-hub"
# Weights formats the HF loaders here never read (a repo may ship several copies of the weights).
MODEL_IGNORE = ("*.gguf", "*.onnx", "onnx/*", "*.h5", "*.msgpack", "*.ot", "*.tflite", "original/*")
DATASET_ALLOW = ("*.jsonl",)  # the trainer and the quantizer read JSON Lines only


class HubError(RuntimeError):
    """An hf:// source could not be downloaded; the message names the URI."""


def is_hf_uri(uri: str) -> bool:
    return uri.startswith(HF_SCHEME)


def repo_id(uri: str) -> str:
    """hf://org/name -> org/name."""
    name = uri[len(HF_SCHEME) :] if is_hf_uri(uri) else ""
    if name.count("/") != 1 or not all(name.split("/")):
        raise HubError(f"{uri!r}: expected hf://<org>/<name>")
    return name


def cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where snapshots go (read from the environment on every call, not at import)."""
    env = os.environ if env is None else env
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"])
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]) / "hub"
    return Path(DEFAULT_CACHE_DIR)


def resolve(uri: str, *, repo_type: str = "model", what: str | None = None) -> Path:
    """The local snapshot directory of hf://org/name (downloaded if needed). `what` (e.g. "model")
    prefixes the error message."""
    from filelock import FileLock
    from huggingface_hub import snapshot_download

    name = repo_id(uri)
    cache = cache_dir()
    prefix = f"{what}: " if what else ""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(cache / f".lmforge-{repo_type}--{name.replace('/', '--')}.lock"))
        with lock:
            path = snapshot_download(
                name,
                repo_type=repo_type,
                cache_dir=cache,
                endpoint=os.environ.get("HF_ENDPOINT") or None,
                token=os.environ.get("HF_TOKEN") or None,
                allow_patterns=list(DATASET_ALLOW) if repo_type == "dataset" else None,
                ignore_patterns=list(MODEL_IGNORE) if repo_type == "model" else None,
            )
    except Exception as exc:  # network, 401/404, disk: one message that names the URI
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = (
            "" if os.environ.get("HF_TOKEN") else " (gated or private repos need HF_TOKEN in the environment)"
        )
        raise HubError(
            f"{prefix}cannot download {uri} ({repo_type} repo) into {cache}: {detail}{hint}"
        ) from exc
    return Path(path)


def snapshot_to(uri: str, local_dir: Path, *, repo_type: str = "model") -> str:
    """Download hf://org/name[@revision] into `local_dir` itself (the storage initializer's
    target, no HF cache layout); returns the commit sha. Files already there are kept
    (snapshot_download resumes and re-checks them)."""
    from huggingface_hub import snapshot_download

    from lmforge.runtime.storage.uri import parse

    parsed = parse(uri)
    endpoint, token = os.environ.get("HF_ENDPOINT") or None, os.environ.get("HF_TOKEN") or None
    sha = revision_of(uri, repo_type=repo_type)
    try:
        snapshot_download(
            parsed.repo_id,
            repo_type=repo_type,
            revision=sha,
            local_dir=local_dir,
            endpoint=endpoint,
            token=token,
            allow_patterns=list(DATASET_ALLOW) if repo_type == "dataset" else None,
            ignore_patterns=list(MODEL_IGNORE) if repo_type == "model" else None,
        )
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = "" if token else " (gated or private repos need HF_TOKEN in the environment)"
        raise HubError(f"cannot download {uri} ({repo_type} repo) into {local_dir}: {detail}{hint}") from exc
    return sha


def revision_of(uri: str, *, repo_type: str = "model") -> str:
    """The commit sha hf://org/name[@revision] resolves to now (one small API request)."""
    from huggingface_hub import HfApi

    from lmforge.runtime.storage.uri import parse

    parsed = parse(uri)
    endpoint, token = os.environ.get("HF_ENDPOINT") or None, os.environ.get("HF_TOKEN") or None
    try:
        info = HfApi(endpoint=endpoint, token=token).repo_info(
            parsed.repo_id, repo_type=repo_type, revision=parsed.revision
        )
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HubError(f"cannot resolve {uri} ({repo_type} repo): {detail}") from exc
    return info.sha or parsed.revision or "main"
