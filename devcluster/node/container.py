"""One container as a local process: start, log to a file per run, restart per restartPolicy with
backoff, probes (startup, readiness, liveness), graceful stop of its whole process group.

Like a container, the process runs in its own session: when the main process exits, whatever it
left behind in its process group is killed too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lmforge.devcluster.node.node import now
from lmforge.devcluster.node.podspec import ProcessSpec
from lmforge.devcluster.node.podstatus import ContainerState
from lmforge.devcluster.node.probes import ProbeTiming, run_probe

BACKOFF_BASE_S, BACKOFF_MAX_S = 2.0, 60.0  # kubelet uses 10 s / 300 s; a dev node is impatient


def exit_code(returncode: int) -> int:
    """Popen's -N (killed by signal N) is a container's 128+N."""
    return 128 - returncode if returncode < 0 else returncode


def log_tail_message(path: Path, max_lines: int = 80, max_bytes: int = 2048) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(tail.strip().splitlines()[-max_lines:])


def backoff_seconds(restarts: int) -> float:
    return min(BACKOFF_BASE_S * 2 ** max(0, restarts - 1), BACKOFF_MAX_S)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Container:
    def __init__(self, spec: Mapping[str, Any], restart_policy: str, log_dir: Path, pod_ip: str) -> None:
        self.spec, self.restart_policy, self.log_dir, self.pod_ip = spec, restart_policy, log_dir, pod_ip
        self.state = ContainerState(name=spec["name"], image=spec.get("image", ""))
        self.process: subprocess.Popen | None = None
        self.process_spec: ProcessSpec | None = None
        self.cwd: str | None = None
        self.restart_at: float | None = None
        self.stopping = False
        self.kill_at: float | None = None
        self._generation = 0
        self._lock = threading.Lock()

    # --- files -------------------------------------------------------------------------------
    def log_path(self, restart: int | None = None) -> Path:
        return self.log_dir / f"{self.state.restart_count if restart is None else restart}.log"

    @property
    def pid_file(self) -> Path:
        return self.log_dir / "pid"

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self, process_spec: ProcessSpec, cwd: str) -> None:
        self.process_spec, self.cwd = process_spec, process_spec.cwd or cwd
        self._launch()

    def _launch(self) -> None:
        assert self.process_spec is not None
        self.log_dir.mkdir(parents=True, exist_ok=True)
        assert self.cwd is not None  # set with process_spec by start()
        Path(self.cwd).mkdir(parents=True, exist_ok=True)
        log = open(self.log_path(), "ab")  # noqa: SIM115 - the child writes it
        state = self.state
        try:
            self.process = subprocess.Popen(
                list(self.process_spec.argv),
                env=self.process_spec.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as error:
            log.write(f"lmforge-localnode: cannot start {self.process_spec.argv[0]!r}: {error}\n".encode())
            self.process = None
            state.started_at = state.finished_at = now()
            self._terminated(128, "StartError", str(error))
            return
        finally:
            log.close()
        self.pid_file.write_text(str(self.process.pid))
        self._generation += 1
        probe = self.spec.get("startupProbe")
        state.state, state.reason, state.message = "running", "", ""
        state.started_at, state.finished_at, state.exit_code = now(), None, None
        state.started = probe is None
        state.ready = state.started and self.spec.get("readinessProbe") is None
        threading.Thread(
            target=self._probe_loop, args=(self._generation,), daemon=True, name=f"probe-{state.name}"
        ).start()

    def _terminated(self, code: int, reason: str, message: str = "") -> None:
        state = self.state
        state.state, state.exit_code, state.reason, state.message = "terminated", code, reason, message
        state.finished_at = state.finished_at or now()
        state.ready = state.started = False
        restart = not self.stopping and (
            self.restart_policy == "Always" or (self.restart_policy == "OnFailure" and code != 0)
        )
        if restart:
            state.last_terminated = state.terminated_dict()
            state.restart_count += 1
            delay = backoff_seconds(state.restart_count)
            self.restart_at = time.monotonic() + delay
            state.state, state.reason = "waiting", "CrashLoopBackOff"
            state.message = f"back-off {delay:g}s restarting failed container={state.name}"

    def _termination_message(self, code: int) -> str:
        """terminationMessagePolicy FallbackToLogsOnError: a failed container's message is the
        tail of its log (the kubelet's 80 lines / 2048 bytes); the File policy has no file here."""
        if code == 0 or self.spec.get("terminationMessagePolicy") != "FallbackToLogsOnError":
            return ""
        return log_tail_message(self.log_path())

    def tick(self) -> bool:
        """Reap an exited process, restart when due, SIGKILL after the grace period.
        True when something changed."""
        changed = False
        with self._lock:
            if self.process is not None and self.process.poll() is not None:
                code = exit_code(self.process.returncode)
                _signal_group(self.process.pid, signal.SIGKILL)  # the rest of the "container"
                self.process = None
                self.state.finished_at = now()
                self._terminated(code, "Completed" if code == 0 else "Error", self._termination_message(code))
                changed = True
            if self.process is not None and self.kill_at is not None and time.monotonic() >= self.kill_at:
                _signal_group(self.process.pid, signal.SIGKILL)
                self.kill_at = None
            if (
                self.restart_at is not None
                and time.monotonic() >= self.restart_at
                and self.process is None
                and not self.stopping
            ):
                self.restart_at = None
                self._launch()
                changed = True
        return changed

    def stop(self, grace_s: float) -> None:
        """SIGTERM to the process group now, SIGKILL once `grace_s` has passed (see tick)."""
        with self._lock:
            self.stopping, self.restart_at = True, None
            if self.process is not None:
                _signal_group(self.process.pid, signal.SIGTERM)
                self.kill_at = time.monotonic() + max(0.0, grace_s)
            elif self.state.state == "waiting":
                self.state.state, self.state.reason = "terminated", "ContainerStatusUnknown"
                self.state.exit_code = self.state.exit_code if self.state.exit_code is not None else 137
                self.state.finished_at = now()

    def kill(self, sig: int = signal.SIGKILL) -> bool:
        """Send `sig` to the main process only (a crash, for tests)."""
        process = self.process
        if process is None:
            return False
        try:
            os.kill(process.pid, sig)
        except ProcessLookupError:
            return False
        return True

    @property
    def alive(self) -> bool:
        return self.process is not None

    # --- probes -----------------------------------------------------------------------------------
    def _probe_loop(self, generation: int) -> None:
        started_mono = time.monotonic()
        spec = self.spec
        probes = {
            kind: spec[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe") if spec.get(kind)
        }
        if not probes:
            return
        due = {kind: started_mono + ProbeTiming.of(p).initial_delay_s for kind, p in probes.items()}
        successes = dict.fromkeys(probes, 0)
        failures = dict.fromkeys(probes, 0)
        while self._generation == generation and self.process is not None and not self.stopping:
            time.sleep(0.2)
            current = time.monotonic()
            for kind, probe in probes.items():
                # the startup probe runs until the container started, the others only after it
                if current < due[kind] or (kind == "startupProbe") == self.state.started:
                    continue
                timing = ProbeTiming.of(probe)
                due[kind] = current + timing.period_s
                assert self.process_spec is not None
                ok, detail = run_probe(probe, spec, self.pod_ip, self.process_spec.env, self.cwd)
                if self._generation != generation:
                    return
                successes[kind], failures[kind] = (successes[kind] + 1, 0) if ok else (0, failures[kind] + 1)
                self._on_probe(
                    kind, ok, detail, timing, successes[kind], failures[kind], "readinessProbe" in probes
                )

    def _on_probe(
        self,
        kind: str,
        ok: bool,
        detail: str,
        timing: ProbeTiming,
        successes: int,
        failures: int,
        has_readiness: bool,
    ) -> None:
        """A probe result against its thresholds (the kubelet's rules): started, ready, or killed."""
        if kind == "startupProbe":
            if ok:
                self.state.started = True
                self.state.ready = not has_readiness
            elif failures >= timing.failure_threshold:
                self._probe_kill(f"Startup probe failed: {detail}")
        elif kind == "readinessProbe":
            if ok and successes >= timing.success_threshold:
                self.state.ready = True
            elif not ok and failures >= timing.failure_threshold:
                self.state.ready = False
        elif kind == "livenessProbe" and not ok and failures >= timing.failure_threshold:
            self._probe_kill(f"Liveness probe failed: {detail}")

    def _probe_kill(self, message: str) -> None:
        process = self.process
        if process is not None:
            self.state.message = message
            grace = float(self.spec.get("terminationGracePeriodSeconds", 30))
            _signal_group(process.pid, signal.SIGTERM)
            self.kill_at = time.monotonic() + grace
