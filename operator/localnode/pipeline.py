"""Inputs and manifests of the train -> quantize -> serve pipeline on the process node, shared by
`make demo` and e2e/test_localnode.py: a tiny random Llama, a tiny chat JSONL, the workers'
ServiceAccount (rank 0 annotates its pod with progress) and the examples/demo manifests with
${DEMO_DIR} filled in."""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import yaml

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "demo"
WORKER_SERVICE_ACCOUNT = "lmforge-worker"
PAIRS = [("What is Kubernetes?", "A system that runs containers on many machines."),
         ("What does an operator do?", "It turns a custom resource into running pods."),
         ("Say hello.", "Hello from lmforge!"),
         ("What is a TrainJob?", "A gang of worker pods that fine-tunes a model.")]


def write_inputs(directory: Path) -> Path:
    """tiny-llama/ (random init, HF layout) and chat.jsonl, made once."""
    directory.mkdir(parents=True, exist_ok=True)
    model = directory / "tiny-llama"
    if not (model / "config.json").exists():
        from lmforge.runtime.models.tiny import save_tiny_model

        save_tiny_model(model, arch="llama")
    data = directory / "chat.jsonl"
    if not data.exists():
        rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                for q, a in PAIRS * 8]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def render(name: str, directory: Path, namespace: str | None = None) -> list[dict[str, Any]]:
    """examples/demo/<name> with ${DEMO_DIR} substituted."""
    text = string.Template((EXAMPLES / name).read_text()).safe_substitute(DEMO_DIR=str(directory))
    docs = [d for d in yaml.safe_load_all(text) if d]
    if namespace:
        for doc in docs:
            doc.setdefault("metadata", {})["namespace"] = namespace
    return docs


def worker_rbac(namespace: str) -> list[dict[str, Any]]:
    """The workers' ServiceAccount; `patch` on pods for the progress annotation."""
    meta = {"name": WORKER_SERVICE_ACCOUNT, "namespace": namespace}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta,
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "patch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta,
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": WORKER_SERVICE_ACCOUNT},
         "subjects": [{"kind": "ServiceAccount", "name": WORKER_SERVICE_ACCOUNT, "namespace": namespace}]},
    ]
