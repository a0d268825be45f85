"""Load test for an OpenAI-compatible server (lmforge, vLLM, ...), in the spirit of `vllm bench serve`.

    # against a running server
    python -m bench.serve --base-url http://127.0.0.1:8000 --tokenizer /models/llama --max-concurrency 16
    # start `lmforge serve` on a free port first (extra server flags after --serve-args)
    python -m bench.serve --model /models/tiny --request-rate 20 --num-prompts 200 \
        --serve-args "--device cpu --max-num-seqs 64"

Load: closed loop (`--max-concurrency N`, each client sends its next request when the last one
ends) and/or open loop (`--request-rate R`: Poisson arrivals at R req/s; inf sends everything at
once). Prompts are `--input-len` random token ids from the tokenizer's vocabulary (sent as ids to
/v1/completions, so the length is exact; decoded to text for /v1/chat/completions), and
`--output-len` tokens are generated with ignore_eos. Every request streams, so TTFT and the gaps
between chunks (ITL) are measured at the client. Prints a table; `--result-json` writes it all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import httpx


@dataclass
class RequestResult:
    ok: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)  # gaps between consecutive content chunks
    error: str = ""


# --- prompts -----------------------------------------------------------------------------------------


def random_prompts(
    tokenizer_path: str, num: int, input_len: int, seed: int
) -> tuple[list[list[int]], list[str]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    rng = random.Random(seed)
    ids = [[rng.choice(vocab) for _ in range(input_len)] for _ in range(num)]
    return ids, [tokenizer.decode(p) for p in ids]


# --- one request ---------------------------------------------------------------------------------------


def _fold_event(data: dict, result: RequestResult, endpoint: str) -> bool:
    """Takes the usage of one streamed chunk into `result`; True when the chunk carries generated text."""
    if data.get("usage"):
        result.output_tokens = data["usage"]["completion_tokens"]
        if endpoint == "chat":
            result.prompt_len = data["usage"]["prompt_tokens"]
    choices = data.get("choices") or []
    return any(c.get("text") or (c.get("delta") or {}).get("content") for c in choices)


async def send(
    client: httpx.AsyncClient,
    endpoint: str,
    model: str,
    prompt_ids: list[int],
    prompt_text: str,
    output_len: int,
) -> RequestResult:
    result = RequestResult(prompt_len=len(prompt_ids))
    body: dict = {
        "model": model,
        "max_tokens": output_len,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream_options": {"include_usage": True},
    }
    if endpoint == "chat":
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": prompt_text}]
    else:
        path = "/v1/completions"
        body["prompt"] = prompt_ids
    start = last = time.perf_counter()
    chunks = 0
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    result.error = str(data["error"])
                    return result
                if not _fold_event(data, result, endpoint):
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    result.ttft_s = now - start
                else:
                    result.itl_s.append(now - last)
                last, chunks = now, chunks + 1
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.e2e_s = time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks
    result.ok = chunks > 0
    return result


# --- load --------------------------------------------------------------------------------------------


async def run_load(
    args: argparse.Namespace, base_url: str, prompts: tuple[list[list[int]], list[str]]
) -> dict:
    ids, texts = prompts
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    concurrency = args.max_concurrency or len(ids)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    rng = random.Random(args.seed)
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, timeout=args.timeout, limits=limits
    ) as client:
        for i in range(min(args.warmup, len(ids))):
            await send(client, args.endpoint, args.model_name, ids[i], texts[i], min(args.output_len, 8))
        sem = asyncio.Semaphore(concurrency)

        async def limited(i: int) -> RequestResult:
            async with sem:
                return await send(client, args.endpoint, args.model_name, ids[i], texts[i], args.output_len)

        tasks = []
        start = time.perf_counter()
        for i in range(len(ids)):
            tasks.append(asyncio.ensure_future(limited(i)))
            if args.request_rate != float("inf") and i + 1 < len(ids):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(args, results, duration)


def _percentiles(values: list[float], name: str, unit_scale: float = 1000.0) -> dict[str, float]:
    if not values:
        return {f"mean_{name}_ms": 0.0, f"median_{name}_ms": 0.0, f"p99_{name}_ms": 0.0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {
        f"mean_{name}_ms": statistics.fmean(values) * unit_scale,
        f"median_{name}_ms": statistics.median(values) * unit_scale,
        f"p99_{name}_ms": p99 * unit_scale,
    }


def summarize(args: argparse.Namespace, results: list[RequestResult], duration: float) -> dict:
    done = [r for r in results if r.ok]
    input_tokens = sum(r.prompt_len for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    tpot = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    summary = {
        "endpoint": args.endpoint,
        "num_prompts": len(results),
        "input_len": args.input_len,
        "output_len": args.output_len,
        "request_rate": str(args.request_rate),
        "max_concurrency": args.max_concurrency,
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        **_percentiles([r.ttft_s for r in done], "ttft"),
        **_percentiles(tpot, "tpot"),
        **_percentiles([x for r in done for x in r.itl_s], "itl"),
        **_percentiles([r.e2e_s for r in done], "e2el"),
        "errors": sorted({r.error for r in results if r.error})[:5],
    }
    if args.save_requests:
        summary["requests"] = [asdict(r) for r in results]
    return summary


def print_summary(s: dict) -> None:
    rows = [
        ("Successful requests", s["completed"]),
        ("Failed requests", s["failed"]),
        ("Benchmark duration (s)", f"{s['duration_s']:.2f}"),
        ("Total input tokens", s["total_input_tokens"]),
        ("Total generated tokens", s["total_output_tokens"]),
        ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{s['output_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{s['total_token_throughput']:.2f}"),
    ]
    for metric, label in (
        ("ttft", "Time to First Token"),
        ("tpot", "Time per Output Token (excl. 1st)"),
        ("itl", "Inter-token Latency"),
        ("e2el", "End-to-end Latency"),
    ):
        rows.append((f"-- {label} --", ""))
        for stat in ("mean", "median", "p99"):
            rows.append((f"{stat.capitalize()} {metric.upper()} (ms)", f"{s[f'{stat}_{metric}_ms']:.2f}"))
    print("=" * 20 + " Serving Benchmark Result " + "=" * 20)
    for name, value in rows:
        print(f"{name:<45}{value:>21}")
    if s["errors"]:
        print("errors:", *s["errors"], sep="\n  ")


# --- optional server ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "lmforge.cli",
        "serve",
        "--model",
        args.model,
        "--port",
        str(port),
        "--served-model-name",
        args.model_name,
        *shlex.split(args.serve_args),
    ]
    log = open(args.server_log, "wb") if args.server_log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.server_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with code {proc.returncode} (see --server-log)")
        try:
            if httpx.get(base_url + "/health", timeout=2).status_code == 200:
                return proc, base_url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not become healthy in time")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--base-url", help="a running server, e.g. http://127.0.0.1:8000")
    target.add_argument("--model", help="start `lmforge serve --model MODEL` on a free port for the run")
    p.add_argument("--serve-args", default="", help="extra `lmforge serve` flags (with --model), one string")
    p.add_argument("--server-log", default=None, help="where the started server's output goes")
    p.add_argument("--server-timeout", type=float, default=600.0)
    p.add_argument(
        "--model-name",
        default=None,
        help="`model` in requests (default: the --model basename or the first of /v1/models)",
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer for random prompts (default: --model)")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument(
        "--max-concurrency", type=int, default=None, help="closed loop: at most N requests in flight"
    )
    p.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson arrivals per second")
    p.add_argument("--warmup", type=int, default=2, help="short requests before timing starts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    p.add_argument("--api-key", default=os.environ.get("LMFORGE_API_KEY"))
    p.add_argument("--result-json", default=None, help="write the summary here")
    p.add_argument("--save-requests", action="store_true", help="include per-request results in the JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.model:
        args.model_name = args.model_name or os.path.basename(os.path.normpath(args.model))
    tokenizer = args.tokenizer or args.model
    if not tokenizer:
        raise SystemExit("--tokenizer is required with --base-url")
    prompts = random_prompts(tokenizer, args.num_prompts, args.input_len, args.seed)
    proc = None
    base_url = args.base_url
    if args.model:
        proc, base_url = start_server(args)
    try:
        if not args.model_name:
            headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
            args.model_name = httpx.get(base_url + "/v1/models", headers=headers, timeout=30).json()["data"][
                0
            ]["id"]
        summary = asyncio.run(run_load(args, base_url, prompts))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    summary["base_url"] = base_url
    summary["model"] = args.model_name
    print_summary(summary)
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
