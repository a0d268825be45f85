"""The local cluster's supervisor: one detached process per cluster that restarts a component
which exited (kube-scheduler exits after an API-server restart with "Scheduler cache is
corrupted", and nothing else would start it again), with a log line per restart.

    python -P -m lmforge.devcluster.cluster.supervisor <state dir>   (started by `cluster up`)

It only acts while the cluster is `ready` and no `cluster up/down/reset` holds the state dir's lock,
and exits when the state is gone (`down`) or names another supervisor. A component that keeps dying
is restarted with a growing delay (`restart_delay`), so a broken binary does not spin.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from lmforge.devcluster.cluster import processes
from lmforge.devcluster.cluster.locking import try_file_lock

MODULE = "lmforge.devcluster.cluster.supervisor"
POLL_S = 1.0
MAX_DELAY_S = 30.0
STABLE_S = 60.0  # alive this long after a restart: its failure count starts over


def restart_delay(failures: int) -> float:
    """Seconds to wait before restart number `failures` (1-based): 0 for the first, then 1, 2, 4 ...
    capped at MAX_DELAY_S."""
    return 0.0 if failures <= 1 else min(2.0 ** (failures - 2), MAX_DELAY_S)


def _log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} supervisor: {message}", flush=True)


def supervise(state_dir: Path) -> int:
    from lmforge.devcluster.cluster import cluster

    layout = cluster.layout_for(state_dir)
    failures: dict[str, int] = {}
    next_try: dict[str, float] = {}
    started_at: dict[str, float] = {}
    _log(f"watching the components of {layout.state_dir}")
    while True:
        time.sleep(POLL_S)
        state = cluster.read_state(layout)
        if state is None or (state.get("supervisor") or {}).get("pid") != os.getpid():
            _log("the cluster was stopped (or has another supervisor): exiting")
            return 0
        if not state.get("ready"):
            continue
        with try_file_lock(layout.lock_file) as locked:
            if not locked:  # `cluster up/down/reset` is at work
                continue
            state = cluster.read_state(layout) or {}
            now = time.monotonic()
            for entry in state.get("processes", []):
                name, process = entry["name"], processes.Process.from_dict(entry)
                if processes.is_alive(process):
                    if now - started_at.get(name, -STABLE_S) >= STABLE_S:
                        failures.pop(name, None)
                    continue
                processes.reap(process.pid)
                if now < next_try.get(name, 0.0):
                    continue
                failures[name] = failures.get(name, 0) + 1
                delay = restart_delay(failures[name] + 1)
                _log(
                    f"{name} (pid {process.pid}) exited: restarting it (restart {failures[name]}; "
                    f"last lines in {process.log})"
                )
                try:
                    new = cluster.restart_component(layout, state, name)
                except (OSError, KeyError, ValueError) as error:
                    _log(f"cannot restart {name}: {error}")
                    next_try[name] = now + max(delay, 1.0)
                    continue
                _log(f"{name} restarted as pid {new.pid}")
                started_at[name], next_try[name] = now, now + delay


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(f"usage: python -P -m {MODULE} <state dir>", file=sys.stderr)
        return 2
    return supervise(Path(args[0]))


if __name__ == "__main__":
    sys.exit(main())
