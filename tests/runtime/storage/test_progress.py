"""Progress of a transfer: bytes, rate and ETA, as the init container's log line and the pod
annotation's payload (pure arithmetic, a fake clock)."""

from __future__ import annotations

from typing import Any

from lmforge.runtime.storage.progress import Meter, human_bytes, progress_line, progress_payload, rate_and_eta

MIB = 1024 * 1024


def test_rate_and_eta() -> None:
    assert rate_and_eta(0, 100, 1.0) == (None, None)
    assert rate_and_eta(50 * MIB, 200 * MIB, 10.0) == (5 * MIB, 30)
    assert rate_and_eta(10, None, 2.0) == (5.0, None)  # hf:// sizes are not known up front


def test_line_and_payload() -> None:
    line = progress_line("downloading", "s3://b/m", 50 * MIB, 200 * MIB, 10.0)
    assert line == "[lmforge.fetch] downloading s3://b/m: 50.0 MiB / 200.0 MiB (25%), 5.0 MiB/s, ETA 30s"
    assert progress_payload(
        uri="s3://b/m", done=50 * MIB, total=200 * MIB, elapsed_s=10.0, phase="Downloading"
    ) == {
        "uri": "s3://b/m",
        "phase": "Downloading",
        "bytes": 50 * MIB,
        "totalBytes": 200 * MIB,
        "bytesPerSecond": 5 * MIB,
        "etaSeconds": 30,
        "cached": None,
    }
    assert human_bytes(512) == "512 B" and human_bytes(3 * 1024**3) == "3.0 GiB"


def test_meter_reports_at_most_every_interval() -> None:
    now = [0.0]
    seen: list[tuple[dict[str, Any], str]] = []
    meter = Meter(
        "s3://b/m", 100, lambda p, line: seen.append((p, line)), interval_s=2.0, clock=lambda: now[0]
    )
    for t in (0.5, 1.0, 1.5, 2.6, 3.0):
        now[0] = t
        meter.add(10)
    assert [p["bytes"] for p, _ in seen] == [10, 40]  # at 0.5 s and at 2.6 s
    now[0] = 4.0
    assert meter.finish(cached=False)["phase"] == "Done" and seen[-1][0]["bytes"] == 50
