"""e2e fixtures: ONE local cluster per test session, in a temporary state dir (never the user's
own cluster, never ~/.kube/config), torn down even when tests fail.

    def test_x(cluster, wait_for):
        cluster.kubectl("apply", "-f", path)
        wait_for(lambda: cluster.kubectl_json("get", "pod", "p")["status"].get("phase") == "Running",
                 timeout=60, message="pod never ran")

    def test_y(cluster, operator_process, wait_for):
        op = operator_process(namespace="ns", env={"LMFORGE_QUANTIZEJOB_INTERVAL_SECONDS": "1"})
        wait_for(lambda: ..., message=op.tail)  # op.kill() / op.start() / op.stop() as the test needs

Environment knobs: LMFORGE_E2E_STATE_DIR reuses a cluster dir across sessions (a cluster that was
already up there is left running afterwards). Every test under e2e/ gets the `e2e` marker.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from lmforge.devcluster.pipeline import OperatorProcess

E2E_DIR = Path(__file__).resolve().parent
BUILD_ERROR = pytest.StashKey[str]()
COMMAND_TIMEOUT_S = 120


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.path)).resolve().is_relative_to(E2E_DIR):
            item.add_marker(pytest.mark.e2e)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the binaries before any test starts: a cold build takes far longer than the
    per-test timeout, which would otherwise count it against the first e2e test."""
    if session.config.option.collectonly or not any(
        "cluster" in getattr(i, "fixturenames", ()) for i in session.items
    ):
        return
    from lmforge.devcluster.cluster.build import BuildError, ensure_binaries

    try:
        ensure_binaries(log=_terminal_logger(session.config))
    except BuildError as error:  # reported by the `cluster` fixture, once per test, no traceback
        session.config.stash[BUILD_ERROR] = str(error)


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 60.0,
    interval: float = 0.5,
    message: str | Callable[[], str] = "",
) -> Any:
    """Poll `predicate` until it returns something truthy and return that; fail the test after
    `timeout` seconds with `message` (a callable is evaluated only then, e.g. to read a log).
    Exceptions from the predicate count as 'not yet' but the last one is reported."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except Exception as error:  # noqa: BLE001 - e.g. the object does not exist yet
            last_error = error
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            suffix = f" (last error: {last_error!r})" if last_error else ""
            raise AssertionError(f"timed out after {timeout:g} s: {text}{suffix}")
        time.sleep(interval)


class CommandError(subprocess.CalledProcessError):
    """CalledProcessError whose message includes what the command printed."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout: {self.stdout}\nstderr: {self.stderr}"


class Cluster:
    """Handle on the session's cluster: the real kubectl and helm, pointed at it."""

    def __init__(self, info) -> None:
        self.info = info
        self.kubeconfig: Path = info.kubeconfig
        self.state_dir: Path = info.state_dir
        self.kubectl_path: Path = info.kubectl
        self.helm_path: Path = info.helm

    def _run(
        self, binary: Path, args: tuple[str, ...], check: bool, input: str | None, timeout: float
    ) -> subprocess.CompletedProcess:
        command = [str(binary), *map(str, args)]
        result = subprocess.run(
            command, input=input, capture_output=True, text=True, env=self.info.env(), timeout=timeout
        )
        if check and result.returncode != 0:
            raise CommandError(result.returncode, command, result.stdout, result.stderr)
        return result

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = COMMAND_TIMEOUT_S
    ) -> subprocess.CompletedProcess:
        return self._run(self.kubectl_path, args, check, input, timeout)

    def kubectl_json(self, *args: str) -> dict:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def helm(
        self, *args: str, check: bool = True, timeout: float = COMMAND_TIMEOUT_S
    ) -> subprocess.CompletedProcess:
        return self._run(self.helm_path, args, check, None, timeout)

    def apply(self, manifest: dict | list[dict]) -> subprocess.CompletedProcess:
        """`kubectl apply` of in-memory objects."""
        items = manifest if isinstance(manifest, list) else [manifest]
        return self.kubectl(
            "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
        )


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from lmforge.devcluster.cluster import cluster as localcluster

    if BUILD_ERROR in request.config.stash:
        pytest.fail(f"cannot build the local cluster: {request.config.stash[BUILD_ERROR]}", pytrace=False)
    configured = os.environ.get("LMFORGE_E2E_STATE_DIR")
    state_dir = Path(configured) if configured else tmp_path_factory.mktemp("lmforge-cluster")
    try:
        info = localcluster.up(state_dir, log=_terminal_logger(request.config))
    except localcluster.ClusterError as error:
        pytest.fail(f"lmforge cluster up failed: {error}", pytrace=False)
    owned = not info.already_running

    stopped: list[bool] = []

    def teardown(log: Callable[[str], None] | None = None) -> None:
        if owned and not stopped:
            stopped.append(True)
            localcluster.down(state_dir, log=log)

    atexit.register(teardown)  # a session killed by Ctrl-C or an internal error still cleans up
    request.addfinalizer(lambda: teardown(_terminal_logger(request.config)))
    cluster_env = info.env()
    keys = ("KUBECONFIG", "PATH", *localcluster.client_env(info.state_dir))
    saved = {key: os.environ.get(key) for key in keys}
    os.environ.update({key: cluster_env[key] for key in keys})  # subprocesses of tests see it too
    try:
        yield Cluster(info)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def operator_process(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., OperatorProcess]]:
    """Factory of operator processes against the session's cluster, all stopped (SIGTERM) when the
    module is done; stop them earlier where the order matters (kopf's finalizers need a running
    operator to let custom resources go, so delete those first).

        op = operator_process(*args, namespace=None, standalone=True, env=None, liveness=False,
                              name="operator")

    runs `lmforge operator run --liveness-port P [--standalone] [-n namespace] *args` with the
    cluster's environment plus `env`, its log in a file of its own; P is a free port with
    `liveness=True` (then `op.healthy()` asks its /healthz), else 0 (no endpoint). The handle is
    lmforge.devcluster.pipeline.OperatorProcess, the demo's too: `.logs()` (all of it),
    `.tail()` (for failure messages), `.stop()` (SIGTERM, returns the exit code), `.kill()`
    (SIGKILL), `.start()` again after either, `.starts`, `.running()`; `with op:` stops it early.
    Module scope so that module-scoped fixtures can start one."""
    from lmforge.devcluster.pipeline import OperatorProcess, free_port

    directory = tmp_path_factory.mktemp("operator")
    started: list[OperatorProcess] = []

    def start(
        *args: str,
        namespace: str | None = None,
        standalone: bool = True,
        env: dict[str, str] | None = None,
        liveness: bool = False,
        name: str = "operator",
    ) -> OperatorProcess:
        flags = (*(["--standalone"] if standalone else []), *(["-n", namespace] if namespace else []), *args)
        op = OperatorProcess(
            {**cluster.info.env(), **(env or {})},
            directory / f"{len(started):02d}-{name}.log",
            flags,
            free_port() if liveness else 0,
        )
        started.append(op)
        return op.start()

    yield start
    for op in reversed(started):
        op.stop()


@pytest.fixture(name="wait_for", scope="session")
def wait_for_fixture() -> Callable[..., Any]:
    """The `wait_for` function: fixtures are how e2e tests share helpers under importlib mode."""
    return wait_for


def _terminal_logger(config: pytest.Config) -> Callable[[str], None]:
    """Progress lines reach the terminal even while pytest captures output (a cold build is long)."""
    capture = config.pluginmanager.getplugin("capturemanager")

    def log(message: str) -> None:
        if capture is None:
            print(message, flush=True)
            return
        with capture.global_and_fixture_disabled():
            print(f"[lmforge cluster] {message}", flush=True)

    return log
