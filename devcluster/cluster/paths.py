"""Where the local cluster keeps things: everything lives under one cache root outside the repo,
so a clean clone stays clean and a rebuilt venv never rebuilds the Go binaries."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "LMFORGE_CACHE_DIR"
CLUSTER_DIR_ENV = "LMFORGE_CLUSTER_DIR"


def cache_root() -> Path:
    """`$LMFORGE_CACHE_DIR`, else `~/.cache/lmforge` (the Makefile uses the same default)."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "lmforge"


def go_root() -> Path:
    """GOMODCACHE, GOCACHE, GOPATH and the wrapper-module work dirs live here."""
    return cache_root() / "go"


def bin_root() -> Path:
    return cache_root() / "bin"


def default_state_dir() -> Path:
    """The user's cluster: `$LMFORGE_CLUSTER_DIR`, else `<cache>/cluster`."""
    configured = os.environ.get(CLUSTER_DIR_ENV)
    return Path(configured).expanduser() if configured else cache_root() / "cluster"


def kubeconfig_path(state_dir: Path) -> Path:
    """The default cluster writes `<cache>/kubeconfig` (what the README exports); any other
    state dir keeps its kubeconfig inside itself so that two clusters never share one."""
    if state_dir.resolve() == (cache_root() / "cluster").resolve():
        return cache_root() / "kubeconfig"
    return state_dir / "kubeconfig"
