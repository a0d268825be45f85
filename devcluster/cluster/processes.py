"""Start and stop the component processes, and the little /proc reading that proves they are gone.

Processes are detached (own session, stdin closed, output to `<state>/logs/<name>.log`) so they
outlive `lmforge cluster up`. We only ever signal a pid we recorded, and only while
/proc/<pid>/exe still is the binary we started (a recycled pid is left alone).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

TCP_LISTEN = "0A"  # st column of /proc/net/tcp{,6}
# Popen objects of children started by this Python process: holding them avoids "still running"
# ResourceWarnings, and lets stop() reap them (a test session starts and stops its own cluster).
_children: dict[int, subprocess.Popen] = {}


@dataclass(frozen=True)
class Process:
    """What `state.json` records for one started component."""

    name: str
    pid: int
    binary: str
    ports: tuple[int, ...]
    log: str

    @classmethod
    def from_dict(cls, data: dict) -> Process:
        return cls(data["name"], int(data["pid"]), data["binary"], tuple(data["ports"]), data["log"])

    def to_dict(self) -> dict:
        return asdict(self)


def pick_free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ask the kernel for `count` distinct free ports (all sockets held open until every port is
    known, so no duplicates). Another process could take one before we bind it: accepted."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def start(name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None) -> Process:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        log.write(f"\n==> {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(argv)}\n".encode())
        log.flush()
        child = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    _children[child.pid] = child
    return Process(name=name, pid=child.pid, binary=argv[0], ports=(), log=str(log_path))


def is_alive(process: Process) -> bool:
    """Running (not a zombie) and still what we started: its executable is our binary, or (for a
    script) the binary is the script its interpreter runs."""
    try:
        exe = os.readlink(f"/proc/{process.pid}/exe").removesuffix(" (deleted)")
        stat = Path(f"/proc/{process.pid}/stat").read_text()
        argv = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")[:2]
    except OSError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    binary = os.path.realpath(process.binary)
    ours = os.path.realpath(exe) == binary or any(os.path.realpath(a.decode()) == binary for a in argv if a)
    return state not in ("Z", "X") and ours


def stop(process: Process, timeout: float = 15.0) -> bool:
    """SIGTERM, wait, then SIGKILL. Returns True if the process is gone (or was never ours)."""
    if not is_alive(process):
        reap(process.pid)
        return True
    _signal(process.pid, signal.SIGTERM)
    if wait_until(lambda: not is_alive(process), timeout):
        reap(process.pid)
        return True
    _signal(process.pid, signal.SIGKILL)
    gone = wait_until(lambda: not is_alive(process), 5.0)
    reap(process.pid)
    return gone


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def parse_listening_ports(proc_net_tcp: str) -> set[int]:
    """Ports in LISTEN state from the text of /proc/net/tcp or /proc/net/tcp6."""
    ports = set()
    for line in proc_net_tcp.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[3] == TCP_LISTEN:
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def listening_ports() -> set[int]:
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            ports |= parse_listening_ports(Path(table).read_text())
        except OSError:
            pass
    return ports


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def reap(pid: int) -> None:
    """Collect the exit status when the process is our own child (inside a test session, or the
    supervisor's restarted components), so it does not linger as a zombie."""
    child = _children.pop(pid, None)
    if child is not None:
        child.poll()
