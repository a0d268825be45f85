"""Packaging guards: the repository root is the `lmforge` package and must never shadow the
standard library, and the wheel must contain every sub-package."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_FOLDERS = ("operator", "runtime", "kernels")


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


def test_operator_folder_is_not_a_regular_package() -> None:
    assert not (ROOT / "operator" / "__init__.py").exists(), (
        "operator/__init__.py would shadow the stdlib `operator` for `python -m` runs in the checkout"
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


def test_console_script_help() -> None:
    exe = Path(sys.executable).parent / "lmforge"
    for args in (["--help"], ["operator", "run", "--help"], ["cluster", "--help"], ["serve", "--help"], ["train", "--help"], ["quantize", "--help"], ["node", "--help"]):
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
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(source)],
        check=True, capture_output=True, text=True,
    )
    (wheel,) = (tmp_path / "dist").glob("lmforge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lmforge/operator/main.py" in names and "lmforge/cli.py" in names
    assert not any(n.startswith(("operator/", "runtime/", "kernels/", "tests/")) for n in names)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True, capture_output=True, text=True,
    )
    code = (
        "import lmforge, lmforge.operator.main, lmforge.runtime.sampling_params, operator, sys;"
        "assert lmforge.__file__.startswith(sys.argv[1]), lmforge.__file__;"
        "assert hasattr(operator, 'itemgetter')"
    )
    subprocess.run([sys.executable, "-c", code, str(target)], cwd=tmp_path, check=True,
                   env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
