"""Packaging guards: the repository root is the `lmforge` package and must never shadow the
standard library, and the wheel must contain every sub-package."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_FOLDERS = ("operator", "runtime", "kernels")
SITE_PACKAGES = Path(sysconfig.get_paths()["purelib"])


def _declared_packages() -> set[str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return set(tomllib.load(f)["tool"]["setuptools"]["packages"])


def _python_folders() -> set[str]:
    """Every folder under the package roots that holds Python modules, as an import name."""
    found = {"lmforge"}
    for top in PACKAGE_FOLDERS:
        for py in (ROOT / top).rglob("*.py"):
            rel = py.parent.relative_to(ROOT)
            if "__pycache__" not in rel.parts:
                found.add(".".join(("lmforge", *rel.parts)))
    return found


def _regular_import_names(folder: Path) -> dict[str, Path]:
    """What `import NAME` finds first when `folder` is on sys.path: its modules and regular packages.
    Folders without `__init__.py` are PEP 420 namespace portions, which any installed module or
    regular package of the same name outranks, so they cannot shadow anything."""
    names: dict[str, Path] = {}
    for entry in folder.iterdir():
        if entry.name.startswith(".") or entry.name == "__pycache__":
            continue
        if entry.is_file() and entry.suffix == ".py":
            names[entry.stem] = entry
        elif entry.is_dir() and (entry / "__init__.py").exists():
            names[entry.name] = entry
    return names


@pytest.mark.parametrize("where", [".", "bench", "tests", "e2e"])
def test_no_checkout_path_shadows_a_distribution_or_stdlib_module(where: str) -> None:
    """The checkout's root (the working directory of `python -m`, `python -c`, a REPL) and bench/
    (sys.path[0] of `python bench/x.py`) must not hold a module or regular package named like an
    installed distribution's top-level name or a stdlib module: transformers >= 5.25 imports the
    `kernels` distribution, which a `kernels/__init__.py` here used to replace."""
    installed = set(importlib.metadata.packages_distributions())
    taken = installed | set(sys.stdlib_module_names)
    clashes = {
        name: str(path.relative_to(ROOT))
        for name, path in _regular_import_names(ROOT / where).items()
        if name in taken and name != "__init__"
    }
    assert not clashes, f"these checkout paths shadow installed or stdlib modules: {clashes}"


_IMPORTS = """
import json, sys
import transformers, kernels, operator
from transformers import AutoModelForCausalLM
print(json.dumps({"kernels": getattr(kernels, "__file__", None), "operator": operator.__file__,
                  "transformers": transformers.__file__, "has_itemgetter": hasattr(operator, "itemgetter")}))
"""


@pytest.mark.parametrize("where", [".", "bench"])
def test_imports_from_inside_the_checkout_find_the_installed_modules(where: str) -> None:
    """`python -c` from the root or bench/ puts that folder first on sys.path: transformers, the
    `kernels` distribution it imports, and the stdlib `operator` must still come from the install."""
    out = subprocess.run(
        [sys.executable, "-c", _IMPORTS], cwd=ROOT / where, check=True, capture_output=True, text=True
    )
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["has_itemgetter"] and Path(found["operator"]).name == "operator.py"
    for name in ("kernels", "transformers"):
        assert found[name] and Path(found[name]).is_relative_to(SITE_PACKAGES), (name, found[name])
    # the demo entry point imports the operator, the local cluster and the runtime pipeline
    help_out = subprocess.run(
        [sys.executable, "-m", "lmforge.devcluster.demo", "--help"],
        cwd=ROOT / where,
        check=True,
        capture_output=True,
        text=True,
    )
    assert "usage:" in help_out.stdout


def test_mapped_folders_are_namespace_portions() -> None:
    """Every top-level folder that package-dir maps into `lmforge` has no `__init__.py`."""
    for top in PACKAGE_FOLDERS:
        assert not (ROOT / top / "__init__.py").exists(), (
            f"{top}/__init__.py would shadow an installed `{top}` for `python -m` runs in the checkout"
        )


def test_python_m_in_the_checkout_uses_stdlib_operator() -> None:
    """`python -m X` puts the working directory first on sys.path; `collections` imports
    `operator` at start-up, so a shadowing folder would break every such command."""
    subprocess.run([sys.executable, "-m", "json.tool", "--help"], cwd=ROOT, check=True, capture_output=True)


def test_import_names_resolve_to_the_checkout() -> None:
    code = "import operator, lmforge.operator.main as m; print(operator.__file__); print(m.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True)
    stdlib_path, main_path = out.stdout.split()
    assert hasattr(__import__("operator"), "itemgetter") and Path(stdlib_path).name == "operator.py"
    assert Path(main_path) == ROOT / "operator" / "main.py"


def test_every_python_folder_is_declared_in_pyproject() -> None:
    assert _python_folders() <= _declared_packages()


def test_devcluster_is_importable_from_the_checkout_but_not_packaged() -> None:
    """The local cluster, process node, demo and test factories are development tools: the editable
    install serves them from the checkout, the wheel (and so the operator image) leaves them out."""
    assert not any(name.startswith("lmforge.devcluster") for name in _declared_packages())
    code = (
        "import lmforge.devcluster.cluster.cluster as c, lmforge.devcluster.pipeline as p; print(c.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-P", "-c", code], cwd="/", check=True, capture_output=True, text=True
    )
    assert Path(out.stdout.strip()) == ROOT / "devcluster" / "cluster" / "cluster.py"


def test_console_script_help() -> None:
    exe = Path(sys.executable).parent / "lmforge"
    for args in (
        ["--help"],
        ["operator", "run", "--help"],
        ["cluster", "--help"],
        ["serve", "--help"],
        ["train", "--help"],
        ["quantize", "--help"],
        ["node", "--help"],
    ):
        out = subprocess.run([str(exe), *args], capture_output=True, text=True, check=True)
        assert "usage: lmforge" in out.stdout


def test_non_editable_wheel_installs_and_imports(tmp_path: Path) -> None:
    """`pip install .` (not only the editable install `make` does) gives the same import names."""
    # Build from the tracked files only, as a clean clone would: an in-tree build reuses build/lib,
    # where files deleted from the repository would linger and be packed.
    source = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    (wheel,) = (tmp_path / "dist").glob("lmforge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lmforge/operator/main.py" in names and "lmforge/cli.py" in names
    assert not any(n.startswith(("operator/", "runtime/", "kernels/", "tests/")) for n in names)
    assert not any(n.startswith(("lmforge/devcluster/", "devcluster/")) for n in names), "dev tooling shipped"
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        text=True,
    )
    code = (
        "import lmforge, lmforge.operator.main, lmforge.runtime.sampling_params, operator, sys;"
        "assert lmforge.__file__.startswith(sys.argv[1]), lmforge.__file__;"
        "assert hasattr(operator, 'itemgetter')"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(target)],
        cwd=tmp_path,
        check=True,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    )
