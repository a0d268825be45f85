"""Fixtures for the chart tests: `render` runs the real `helm template` (the binary the local
cluster build puts in the cache, or one on PATH); tests that need it skip where there is none."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "lmforge"


def find_helm() -> str | None:
    from lmforge.devcluster.cluster.build import bin_dir

    built = bin_dir() / "helm"
    return str(built) if built.is_file() else shutil.which("helm")


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., subprocess.CompletedProcess]:
    binary = find_helm()
    if binary is None:
        pytest.skip("no helm binary (`lmforge cluster up` builds one into ~/.cache/lmforge/bin)")
    home = tmp_path_factory.mktemp("helm-home")
    env = {**os.environ, "HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
           "HELM_DATA_HOME": str(home / "data")}

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([binary, *args], capture_output=True, text=True, env=env, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    return run


@pytest.fixture(scope="session")
def render(helm) -> Callable[..., list[dict[str, Any]]]:
    """`helm template` with `--set` pairs (or `-f` files); the objects, without empty documents."""

    def run(*values: str, namespace: str = "lmforge-system") -> list[dict[str, Any]]:
        args = [arg for value in values for arg in (("-f", value[2:]) if value.startswith("f=") else ("--set", value))]
        out = helm("template", "lmforge", str(CHART), "-n", namespace, *args).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]

    return run

