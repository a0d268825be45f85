"""Kubeconfig files: a pure renderer plus a writer. Credentials are embedded (base64) so a
kubeconfig keeps working when copied, and the state dir's pki/ stays the single source."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import yaml


def render_kubeconfig(
    server: str, ca_pem: bytes, cert_pem: bytes, key_pem: bytes, name: str = "lmforge", user: str = "admin"
) -> dict:
    """One cluster, one user, one context (`name`), current-context set."""

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": name, "cluster": {"server": server, "certificate-authority-data": b64(ca_pem)}}
        ],
        "users": [
            {
                "name": user,
                "user": {"client-certificate-data": b64(cert_pem), "client-key-data": b64(key_pem)},
            }
        ],
        "contexts": [{"name": name, "context": {"cluster": name, "user": user, "namespace": "default"}}],
        "current-context": name,
        "preferences": {},
    }


def write_kubeconfig(path: Path, config: dict) -> Path:
    """Atomic and private (0600): it holds a cluster-admin key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        yaml.safe_dump(config, handle, sort_keys=False)
    tmp.replace(path)
    return path
