"""Build the control-plane binaries from Go modules into `<cache>/bin/<kubernetes version>/`.

There is no registry that ships kube-apiserver & co. for a machine without Docker, so we compile
them. The plan (which binary, from which wrapper module, with which version ldflags) is a pure
function of `Versions`; `build()` only runs it. Each wrapper module under `gomod/<name>/` carries a
go.mod (require + the staging replaces) and a go.sum, so a clean clone needs nothing but the Go
module proxy, and the checksum database is never asked.

Bumping a version: change `Versions`, then in gomod/<name>/go.mod the `require` (for kubernetes
also every `replace`, to the matching v0.<minor>.<patch> tag; modules the new k8s.io/kubernetes
go.mod requires at v0.0.0 need one) and run `go mod tidy` there. tests/devcluster/cluster
checks that the pins and `Versions` agree.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.devcluster.cluster import paths
from lmforge.devcluster.cluster.locking import file_lock

GOMOD_DIR = Path(__file__).parent / "gomod"
MIN_GO = (1, 26)
DEFAULT_GO = "/usr/local/go/bin/go"  # where the go.dev tarball goes
MAX_PARALLEL_BUILDS = 2  # the reference machine has 2 cores; one `go build` already uses both
GO_INSTALL_HINT = (
    "Go >= {min} is needed to build the control plane (Debian/Ubuntu `golang` packages are older).\n"
    "Install it from https://go.dev/dl/, e.g.:\n"
    "  curl -fsSL https://go.dev/dl/go1.26.8.linux-amd64.tar.gz | sudo tar -C /usr/local -xz\n"
    "  export PATH=/usr/local/go/bin:$PATH\n"
    "or point LMFORGE_GO at a go binary."
)


@dataclass(frozen=True)
class Versions:
    """Every component is pinned; kwok v0.8 and helm v3.21 are built against the 1.36 libraries."""

    kubernetes: str = "v1.36.3"
    kubernetes_date: str = "2026-07-22T18:07:38Z"  # tag time from the Go proxy: reproducible buildDate
    etcd: str = "v3.6.16"
    kwok: str = "v0.8.0"
    helm: str = "v3.21.4"
    helm_kube_minor: str = "36"  # helm's client-go minor: the default .Capabilities.KubeVersion


@dataclass(frozen=True)
class BuildStep:
    binary: str  # file name under the bin dir
    gomod: str  # wrapper module, gomod/<gomod>/
    package: str  # Go main package to build
    version: str  # what the binary reports
    ldflags: tuple[str, ...] = field(default=())

    @property
    def fingerprint(self) -> str:
        """Changes whenever anything that goes into the binary changes (module pins included)."""
        digest = hashlib.sha256()
        digest.update(json.dumps([self.binary, self.package, self.version, self.ldflags]).encode())
        for name in ("go.mod", "go.sum"):
            wrapper_file = GOMOD_DIR / self.gomod / name
            if wrapper_file.exists():
                digest.update(wrapper_file.read_bytes())
        return digest.hexdigest()[:16]


@dataclass(frozen=True)
class BinPaths:
    """Absolute paths of the built binaries; `kubectl` and `helm` are what tests and the demo run."""

    bin_dir: Path

    def __getitem__(self, binary: str) -> Path:
        return self.bin_dir / binary

    etcd = property(lambda self: self["etcd"])
    kube_apiserver = property(lambda self: self["kube-apiserver"])
    kube_controller_manager = property(lambda self: self["kube-controller-manager"])
    kube_scheduler = property(lambda self: self["kube-scheduler"])
    kubectl = property(lambda self: self["kubectl"])
    kwok = property(lambda self: self["kwok"])
    helm = property(lambda self: self["helm"])


class BuildError(RuntimeError):
    """A step failed; `str()` says which and carries the tail of go's output, never a traceback."""


def kube_version_ldflags(version: str, build_date: str) -> tuple[str, ...]:
    """hack/lib/version.sh, reduced: without these the apiserver reports v0.0.0-master, which
    helm and kopf's version checks reject. Both copies of the version package get the values."""
    major, minor = version.lstrip("v").split(".")[:2]
    values = {
        "gitVersion": version,
        "gitMajor": major,
        "gitMinor": minor,
        "gitTreeState": "clean",
        "buildDate": build_date,
    }
    return tuple(
        f"-X {package}.{key}={value}"
        for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")
        for key, value in values.items()
    )


def build_plan(versions: Versions = Versions()) -> list[BuildStep]:
    """Ordered so that the two parallel slots pair a Kubernetes binary with an unrelated one:
    two concurrent builds of the same packages would compile them twice."""
    kube = kube_version_ldflags(versions.kubernetes, versions.kubernetes_date)
    k8s = "k8s.io/kubernetes/cmd/"
    return [
        BuildStep("kube-apiserver", "kubernetes", k8s + "kube-apiserver", versions.kubernetes, kube),
        BuildStep(
            "etcd",
            "etcd",
            "go.etcd.io/etcd/server/v3",
            versions.etcd,
            (f"-X go.etcd.io/etcd/api/v3/version.GitSHA={versions.etcd}",),
        ),
        BuildStep(
            "kube-controller-manager",
            "kubernetes",
            k8s + "kube-controller-manager",
            versions.kubernetes,
            kube,
        ),
        BuildStep(
            "kwok",
            "kwok",
            "sigs.k8s.io/kwok/cmd/kwok",
            versions.kwok,
            (f"-X sigs.k8s.io/kwok/pkg/consts.Version={versions.kwok.lstrip('v')}",),
        ),
        BuildStep("kube-scheduler", "kubernetes", k8s + "kube-scheduler", versions.kubernetes, kube),
        BuildStep(
            "helm",
            "helm",
            "helm.sh/helm/v3/cmd/helm",
            versions.helm,
            (
                f"-X helm.sh/helm/v3/internal/version.version={versions.helm}",
                "-X helm.sh/helm/v3/internal/version.gitTreeState=clean",
                "-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1",
                f"-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor={versions.helm_kube_minor}",
                "-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1",
                f"-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor={versions.helm_kube_minor}",
            ),
        ),
        BuildStep("kubectl", "kubernetes", k8s + "kubectl", versions.kubernetes, kube),
    ]


def go_env(go_root: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """Keep every byte Go writes inside the cache; static binaries so no C toolchain is needed."""
    env = dict(os.environ if base is None else base)
    env.update(
        GOMODCACHE=str(go_root / "mod"),
        GOCACHE=str(go_root / "build"),
        GOPATH=str(go_root / "path"),
        GOFLAGS="-modcacherw -trimpath -buildvcs=false -mod=readonly",
        CGO_ENABLED="0",
        GOTOOLCHAIN="local",
        GOWORK="off",
    )
    return env


def go_build_command(go: str, step: BuildStep, output: Path) -> list[str]:
    ldflags = " ".join(("-s", "-w", *step.ldflags))
    return [go, "build", "-o", str(output), "-ldflags", ldflags, step.package]


def parse_go_version(text: str) -> tuple[int, int] | None:
    """'go1.26.8' / 'go version go1.26.8 linux/amd64' -> (1, 26)."""
    match = re.search(r"go(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def find_go() -> str:
    """`$LMFORGE_GO`, `go` on PATH, or the go.dev tarball's default location."""
    hint = GO_INSTALL_HINT.format(min=".".join(map(str, MIN_GO)))
    candidates = [os.environ.get("LMFORGE_GO"), shutil.which("go"), DEFAULT_GO]
    go = next((c for c in candidates if c and os.access(c, os.X_OK)), None)
    if go is None:
        raise BuildError("step 'find Go' failed: no `go` binary found.\n" + hint)
    result = subprocess.run(
        [go, "env", "GOVERSION"], capture_output=True, text=True, env=dict(os.environ, GOTOOLCHAIN="local")
    )
    found = parse_go_version(result.stdout)
    if result.returncode != 0 or found is None or found < MIN_GO:
        reported = (result.stdout or result.stderr).strip() or "unknown"
        raise BuildError(f"step 'find Go' failed: {go} is {reported}.\n" + hint)
    return go


def bin_dir(versions: Versions = Versions()) -> Path:
    return paths.bin_root() / versions.kubernetes


def missing_steps(plan: list[BuildStep], directory: Path) -> list[BuildStep]:
    """Steps whose binary is absent or was built from a different plan (see `fingerprint`)."""
    manifest = _read_manifest(directory)
    return [s for s in plan if not (directory / s.binary).exists() or manifest.get(s.binary) != s.fingerprint]


def ensure_binaries(versions: Versions = Versions(), log: Callable[[str], None] | None = None) -> BinPaths:
    """Build whatever is missing (a cold build takes tens of minutes on 2 cores), else return at once."""
    directory = bin_dir(versions)
    plan = build_plan(versions)
    if not missing_steps(plan, directory):
        return BinPaths(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with file_lock(directory / ".build.lock"):  # two test sessions must not build into one dir
        todo = missing_steps(plan, directory)
        if todo:
            build(todo, directory, log=log or _stderr)
    return BinPaths(directory)


def build(steps: list[BuildStep], directory: Path, log: Callable[[str], None]) -> None:
    go = find_go()
    directory.mkdir(parents=True, exist_ok=True)
    root = paths.go_root()
    env = go_env(root)
    log_dir = root / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    log(
        f"building {len(steps)} binaries into {directory} with {go} "
        f"(at most {MAX_PARALLEL_BUILDS} at a time; a cold build takes many minutes)"
    )
    failed = threading.Event()  # fail fast: once a step fails, steps not yet started are skipped

    def run(index: int, step: BuildStep) -> None:
        if failed.is_set():
            return
        try:
            _build_one(go, step, index, len(steps), directory, root, env, log_dir, log)
        except BaseException:
            failed.set()
            raise

    with ThreadPoolExecutor(MAX_PARALLEL_BUILDS) as pool:
        futures = [pool.submit(run, i, s) for i, s in enumerate(steps, 1)]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        text = "\n\n".join(str(e) for e in errors)
        raise BuildError(text + network_hint(text, env.get("GOPROXY", "https://proxy.golang.org,direct")))
    log(f"built {len(steps)} binaries in {time.monotonic() - started:.0f} s")


def _build_one(
    go: str,
    step: BuildStep,
    index: int,
    total: int,
    directory: Path,
    root: Path,
    env: dict[str, str],
    log_dir: Path,
    log: Callable[[str], None],
) -> None:
    log(f"building {step.binary} {step.version} ({index}/{total})…")
    started = time.monotonic()
    # A private copy of the wrapper module: the package dir may be read-only (site-packages).
    workdir = root / "src" / step.gomod
    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("go.mod", "go.sum"):
        shutil.copyfile(GOMOD_DIR / step.gomod / name, workdir / name)
    output = directory / f".{step.binary}.partial"
    build_log = log_dir / f"{step.binary}.log"
    with open(build_log, "w") as out:
        result = subprocess.run(
            go_build_command(go, step, output), cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    if result.returncode != 0:
        raise BuildError(
            f"step 'build {step.binary}' failed (go exited {result.returncode}); "
            f"last lines of {build_log}:\n{tail(build_log)}"
        )
    output.replace(directory / step.binary)
    _record(directory, step)
    log(f"built {step.binary} in {time.monotonic() - started:.0f} s")


NETWORK_SYMPTOMS = (
    "dial tcp",
    "no such host",
    "i/o timeout",
    "connection refused",
    "TLS handshake",
    "lookup disabled by GOPROXY=off",
    "proxyconnect",
    "network is unreachable",
)


def network_hint(go_output: str, goproxy: str) -> str:
    """The first build downloads ~1.6 GB of modules; say so when go could not reach them."""
    if not any(symptom in go_output for symptom in NETWORK_SYMPTOMS):
        return ""
    return (
        f"\n\nGo could not download modules (GOPROXY={goproxy}). The first build needs the Go module "
        f"proxy; set GOPROXY to a reachable proxy or pre-fill {paths.go_root() / 'mod'}."
    )


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def _read_manifest(directory: Path) -> dict[str, str]:
    try:
        return json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


def _record(directory: Path, step: BuildStep) -> None:
    with file_lock(directory / ".manifest.lock"):  # the two build threads finish independently
        manifest = _read_manifest(directory)
        manifest[step.binary] = step.fingerprint
        tmp = directory / "manifest.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        tmp.replace(directory / "manifest.json")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
