"""Download/upload progress: bytes, rate and ETA, as a log line (the init container's `kubectl
logs`) and as a JSON payload (the pod annotation `lmforge.dev/fetch`, folded into the owner's
status by the operator). The arithmetic and formatting are pure; `Meter` is the thread-safe
counter the transfer threads feed."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

ANNOTATION = "lmforge.dev/fetch"
LINE_INTERVAL_S = 2.0


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def rate_and_eta(done: int, total: int | None, elapsed_s: float) -> tuple[float | None, int | None]:
    """Bytes per second so far and seconds left at that pace (None before anything moved)."""
    if done <= 0 or elapsed_s <= 0:
        return None, None
    rate = done / elapsed_s
    eta = None if total is None else max(0, math.ceil((total - done) / rate))
    return rate, eta


def progress_payload(
    *, uri: str, done: int, total: int | None, elapsed_s: float, phase: str, cached: bool | None = None
) -> dict[str, Any]:
    """The annotation's object: {uri, phase (Downloading|Uploading|Done), bytes, totalBytes,
    bytesPerSecond, etaSeconds, cached}."""
    rate, eta = rate_and_eta(done, total, elapsed_s)
    return {
        "uri": uri,
        "phase": phase,
        "bytes": done,
        "totalBytes": total,
        "bytesPerSecond": None if rate is None else round(rate),
        "etaSeconds": eta,
        "cached": cached,
    }


def progress_line(verb: str, uri: str, done: int, total: int | None, elapsed_s: float) -> str:
    rate, eta = rate_and_eta(done, total, elapsed_s)
    amount = human_bytes(done) + ("" if total is None else f" / {human_bytes(total)}")
    if total:
        amount += f" ({100 * done / total:.0f}%)"
    speed = "" if rate is None else f", {human_bytes(rate)}/s"
    left = "" if eta is None else f", ETA {eta}s"
    return f"[lmforge.fetch] {verb} {uri}: {amount}{speed}{left}"


class Meter:
    """Counts bytes from many threads; calls `report(payload, line)` at most every `interval_s`
    (and on `finish`)."""

    def __init__(
        self,
        uri: str,
        total: int | None,
        report: Callable[[dict[str, Any], str], None],
        phase: str = "Downloading",
        interval_s: float = LINE_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.uri, self.total, self.report, self.phase = uri, total, report, phase
        self.interval_s, self.clock = interval_s, clock
        self.done = 0
        self.started = clock()
        self._last = -math.inf
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = self.clock()
            if now - self._last < self.interval_s:
                return
            self._last = now
            done = self.done
        self._emit(done, self.phase)

    def finish(self, cached: bool | None = None) -> dict[str, Any]:
        payload = self._emit(self.done, "Done", cached)
        return payload

    def _emit(self, done: int, phase: str, cached: bool | None = None) -> dict[str, Any]:
        elapsed = self.clock() - self.started
        payload = progress_payload(
            uri=self.uri, done=done, total=self.total, elapsed_s=elapsed, phase=phase, cached=cached
        )
        verb = {"Downloading": "downloading", "Uploading": "uploading"}.get(phase, "done")
        self.report(payload, progress_line(verb, self.uri, done, self.total, elapsed))
        return payload
