"""Second-replica start time with the node model cache vs without, on one machine (one "node").

    python -m bench.model_cache                           # ~100 MB float32 model, serve start included
    python -m bench.model_cache --hidden-size 64 --layers 2 --no-serve   # smoke

A replica starts as an InferenceService pod does: its storage initializer (`lmforge fetch SRC DST`,
a subprocess) fills the pod's model directory from s3:// (a real S3 API server on loopback: moto
in server mode), then `lmforge serve` loads it until /health answers 200. Replica 1 starts cold
and fills the cache; replica 2 starts (a) without a cache: a second full download into its own
directory, (b) with the cache: symlinks into the entry, and its fetch runs with AWS_ENDPOINT_URL
pointed at a dead port, so any request would fail it (the warm start touches no network).
Baselines in the same process, same model, same machine. Prints one JSON object. Loopback S3 is
far faster than a real network, so the download share here is a lower bound.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

LMFORGE = [sys.executable, "-P", "-m", "lmforge.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fetch(src: str, dst: Path, env: dict[str, str], cache: Path | None) -> float:
    command = [*LMFORGE, "fetch", src, str(dst), *(["--cache-dir", str(cache)] if cache else [])]
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"lmforge fetch failed ({done.returncode}):\n{done.stderr}")
    return time.monotonic() - started


def serve_until_healthy(model_dir: Path, env: dict[str, str], log: Path) -> float:
    port = free_port()
    command = [*LMFORGE, "serve", "--model", str(model_dir), "--port", str(port), "--device", "cpu",
               "--max-model-len", "256", "--max-num-seqs", "4"]  # fmt: skip
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"lmforge serve exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def replica(
    src: str, pod_dir: Path, env: dict[str, str], cache: Path | None, serve: bool, log: Path
) -> dict[str, float]:
    fetch_s = fetch(src, pod_dir, env, cache)
    serve_s = serve_until_healthy(pod_dir, env, log) if serve else 0.0
    return {
        "fetch_s": round(fetch_s, 3),
        "serve_s": round(serve_s, 3),
        "total_s": round(fetch_s + serve_s, 3),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from lmforge.devcluster.s3server import S3Server
    from lmforge.runtime.models.tiny import save_tiny_model
    from lmforge.runtime.storage.transfer import upload

    work = Path(tempfile.mkdtemp(prefix="lmforge-bench-cache-"))
    model = save_tiny_model(work / "model", hidden_size=args.hidden_size, num_layers=args.layers,
                            num_heads=8 if args.hidden_size >= 256 else 4, num_kv_heads=2,
                            vocab_size=args.vocab_size)  # fmt: skip
    model_bytes = sum(p.stat().st_size for p in model.rglob("*") if p.is_file())
    server = S3Server().start()
    try:
        server.create_bucket("bench")
        env = {**os.environ, **server.env(), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        os.environ.update(server.env())
        upload(model, "s3://bench/model", report=lambda payload, line: None)
        src, cache = "s3://bench/model", work / "node-cache"
        first = replica(src, work / "pod-1", env, cache, args.serve, work / "serve-1.log")
        offline = {**env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}  # a warm start must not need S3
        warm = [replica(src, work / f"pod-2-cache-{i}", offline, cache, args.serve, work / f"serve-w{i}.log")
                for i in range(args.repeats)]  # fmt: skip
        cold = [replica(src, work / f"pod-2-nocache-{i}", env, None, args.serve, work / f"serve-c{i}.log")
                for i in range(args.repeats)]  # fmt: skip
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    def median(runs: list[dict[str, float]], key: str) -> float:
        values = sorted(r[key] for r in runs)
        return values[len(values) // 2]

    without = {k: median(cold, k) for k in ("fetch_s", "serve_s", "total_s")}
    with_cache = {k: median(warm, k) for k in ("fetch_s", "serve_s", "total_s")}
    return {
        "bench": "model_cache",
        "model_bytes": model_bytes,
        "repeats": args.repeats,
        "serve_included": args.serve,
        "first_replica_cold": first,
        "second_replica_without_cache": without,
        "second_replica_with_cache": with_cache,
        "fetch_speedup": round(without["fetch_s"] / max(with_cache["fetch_s"], 1e-9), 2),
        "start_speedup": round(without["total_s"] / max(with_cache["total_s"], 1e-9), 2),
        "runs": {"without_cache": cold, "with_cache": warm},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=3, help="second-replica starts per variant (median)")
    parser.add_argument("--no-serve", dest="serve", action="store_false", help="time the fetch only")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (models, logs)")
    args = parser.parse_args(argv)
    print(json.dumps(run(args), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
