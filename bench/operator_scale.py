"""Operator at scale: apply N TrainJobs of M nodes, measure apply -> all pods created.

    python -m bench.operator_scale --jobs 500 --nodes 4            # starts a local cluster
    python -m bench.operator_scale --jobs 500 --kubeconfig ~/.kube/config --namespace bench

Prints one JSON object: latency percentiles (seconds from the moment a watch first sees a
TrainJob, i.e. the API server accepted the `kubectl apply`, to the moment a watch first sees the
last of its pods), throughput, and the operator's RSS and CPU time. The operator is the real
`lmforge operator run --standalone`, as a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LMFORGE = str(Path(sys.executable).parent / "lmforge")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(int(round(q / 100 * (len(ordered) - 1))), len(ordered) - 1)
    return ordered[index]


def trainjob(name: str, namespace: str, nodes: int) -> dict[str, Any]:
    return {
        "apiVersion": "lmforge.dev/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": "/models/llama",
            "dataset": {"source": "/data/train.jsonl"},
            "output": {"dir": f"/out/{name}"},
            "numNodes": nodes,
        },
    }


class Watch(threading.Thread):
    """Records when each object (pods of TrainJobs, or TrainJobs) of the namespace was first seen."""

    def __init__(self, namespace: str, kind: str) -> None:
        super().__init__(daemon=True)
        from kubernetes import client, config

        config.load_kube_config()
        if kind == "pods":
            api = client.CoreV1Api()
            self.list = lambda **kw: api.list_namespaced_pod(
                namespace, label_selector="lmforge.dev/job-name", **kw
            )
        else:
            api = client.CustomObjectsApi()
            self.list = lambda **kw: api.list_namespaced_custom_object(
                "lmforge.dev", "v1alpha1", namespace, "trainjobs", **kw
            )
        self.first_seen: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        from kubernetes import watch

        while not self.stop.is_set():
            try:
                for event in watch.Watch().stream(self.list, timeout_seconds=30):
                    obj = event["object"]
                    name = obj["metadata"]["name"] if isinstance(obj, dict) else obj.metadata.name
                    self.first_seen.setdefault(name, time.monotonic())
                    if self.stop.is_set():
                        break
            except Exception:  # noqa: BLE001 - reconnect on any watch error
                time.sleep(0.5)


class Sampler(threading.Thread):
    """Peak RSS and CPU seconds of a process, from /proc."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak_rss_mb, self.stop = pid, 0.0, threading.Event()

    def rss_mb(self) -> float:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def cpu_seconds(self) -> float:
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            return 0.0

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak_rss_mb = max(self.peak_rss_mb, self.rss_mb())
            time.sleep(0.5)


def kubectl(*args: str, input: str | None = None) -> str:
    return subprocess.run(["kubectl", *args], input=input, capture_output=True, text=True, check=True).stdout


def run(jobs: int, nodes: int, namespace: str, batch: int, timeout: float, log_path: Path) -> dict[str, Any]:
    kubectl("apply", "-f", str(ROOT / "crds"))
    kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/trainjobs.lmforge.dev")
    subprocess.run(["kubectl", "create", "namespace", namespace], capture_output=True)
    watcher, job_watcher = Watch(namespace, "pods"), Watch(namespace, "trainjobs")
    watcher.start()
    job_watcher.start()
    time.sleep(2)  # both watches established
    log = open(log_path, "w")  # noqa: SIM115
    operator = subprocess.Popen(
        [LMFORGE, "operator", "run", "--standalone", "--liveness-port", "0", "-n", namespace],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    sampler = Sampler(operator.pid)
    sampler.start()
    try:
        time.sleep(3)  # operator start-up (imports, first LIST of pods and jobs)
        idle_rss = sampler.rss_mb()
        applied: dict[str, float] = {}
        names = [f"scale-{i:04d}" for i in range(jobs)]
        start = time.monotonic()
        for offset in range(0, jobs, batch):
            chunk = names[offset : offset + batch]
            body = {
                "apiVersion": "v1",
                "kind": "List",
                "items": [trainjob(n, namespace, nodes) for n in chunk],
            }
            before = time.monotonic()
            kubectl("apply", "--server-side", "-f", "-", input=json.dumps(body))
            for name in chunk:
                applied[name] = before
        apply_seconds = time.monotonic() - start
        applied.update({n: t for n, t in job_watcher.first_seen.items() if n in applied})  # API server's time
        expected = {f"{name}-{rank}" for name in names for rank in range(nodes)}
        deadline = time.monotonic() + timeout
        while not expected <= watcher.first_seen.keys() and time.monotonic() < deadline:
            time.sleep(0.5)
        seen = watcher.first_seen
        latencies = [
            max(seen[f"{n}-{r}"] for r in range(nodes)) - applied[n]
            for n in names
            if all(f"{n}-{r}" in seen for r in range(nodes))
        ]
        last = max((seen[p] for p in expected if p in seen), default=start)
        return {
            "jobs": jobs,
            "nodes_per_job": nodes,
            "pods_expected": len(expected),
            "pods_created": len(expected & seen.keys()),
            "jobs_complete": len(latencies),
            "apply_seconds": round(apply_seconds, 2),
            "all_pods_seconds": round(last - start, 2),
            "pods_per_second": round(len(expected & seen.keys()) / max(last - start, 1e-9), 1),
            "latency_seconds": {
                "p50": round(percentile(latencies, 50), 2) if latencies else None,
                "p90": round(percentile(latencies, 90), 2) if latencies else None,
                "p99": round(percentile(latencies, 99), 2) if latencies else None,
                "max": round(max(latencies), 2) if latencies else None,
                "mean": round(statistics.fmean(latencies), 2) if latencies else None,
            },
            "operator_rss_mb": {
                "idle": round(idle_rss, 1),
                "peak": round(sampler.peak_rss_mb, 1),
                "end": round(sampler.rss_mb(), 1),
            },
            "operator_cpu_seconds": round(sampler.cpu_seconds(), 1),
            "cpu_count": os.cpu_count(),
        }
    finally:
        sampler.stop.set()
        watcher.stop.set()
        job_watcher.stop.set()
        # delete the jobs while the operator runs: it releases their finalizers
        subprocess.run(
            ["kubectl", "delete", "trainjobs", "--all", "-n", namespace, "--timeout=600s"],
            capture_output=True,
        )
        operator.send_signal(signal.SIGTERM)
        try:
            operator.wait(30)
        except subprocess.TimeoutExpired:
            operator.kill()
        log.close()
        subprocess.run(["kubectl", "delete", "namespace", namespace, "--wait=false"], capture_output=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--nodes", type=int, default=4, help="numNodes of each TrainJob")
    parser.add_argument("--namespace", default="bench-operator-scale")
    parser.add_argument("--batch", type=int, default=50, help="TrainJobs per kubectl apply")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for all pods")
    parser.add_argument("--kubeconfig", help="use this cluster instead of starting a local one")
    parser.add_argument("--state-dir", help="local cluster state dir (default: a temporary one)")
    parser.add_argument("--operator-log", default=None, help="where the operator's log goes")
    args = parser.parse_args(argv)

    owned = None
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    else:
        from lmforge.devcluster.cluster import cluster as localcluster

        state_dir = Path(args.state_dir or tempfile.mkdtemp(prefix="lmforge-bench-"))
        info = localcluster.up(state_dir, log=lambda m: print(m, file=sys.stderr))
        os.environ.update({k: info.env()[k] for k in ("KUBECONFIG", "PATH")})
        owned = None if info.already_running else state_dir
    log_path = Path(args.operator_log or tempfile.mktemp(prefix="lmforge-operator-", suffix=".log"))
    try:
        result = run(args.jobs, args.nodes, args.namespace, args.batch, args.timeout, log_path)
        result["operator_log"] = str(log_path)
        print(json.dumps(result, indent=2))
    finally:
        if owned is not None:
            from lmforge.devcluster.cluster import cluster as localcluster

            localcluster.down(owned)
    return 0


if __name__ == "__main__":
    sys.exit(main())
