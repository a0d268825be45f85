"""lmforge.runtime.quantize: W8A16 / W4A16 (RTN, GPTQ, AWQ) / FP8 into compressed-tensors checkpoints
that transformers, vLLM and `lmforge serve` load (`lmforge quantize`, what QuantizeJob pods run).

    lmforge quantize --model IN --method w4a16-gptq --calibration calib.jsonl --output OUT

Exit codes: 0 done, 2 bad request (options, data, model), 1 anything else. On failure the error also
goes to /dev/termination-log, which Kubernetes shows in the pod status (and the operator in
QuantizeJob.status.lastFailure). Heavy imports (torch, transformers) happen inside `main`.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

TERMINATION_LOG = Path("/dev/termination-log")


def _termination_message(message: str) -> None:
    try:
        if TERMINATION_LOG.exists():
            TERMINATION_LOG.write_text(message[-4000:])
    except OSError:
        pass


def summary_line(result: dict) -> str:
    """One line for humans: sizes, quality, time."""
    mib = 1024 * 1024
    parts = [
        f"{result['sizeBytesBefore'] / mib:.1f}MiB -> {result['sizeBytesAfter'] / mib:.1f}MiB"
        f" ({result['compression']}x)"
    ]
    if result.get("klDivergence") is not None:
        parts.append(
            f"KL {result['klDivergence']:.3g}, top-1 agreement {100 * result['top1Agreement']:.1f}% "
            f"on {result['evalPositions']} held-out positions ({result['evalSource']})"
        )
    parts.append(f"{result['durationSeconds']:.1f}s")
    return f"[lmforge.quantize] {result['method']}: " + ", ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    from lmforge.runtime.hub import HubError
    from lmforge.runtime.quantize.config import QuantizeError, QuantizeOptions
    from lmforge.runtime.quantize_args import build_parser
    from lmforge.runtime.storage.s3 import StorageError

    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        options = QuantizeOptions.from_args(args)
        from lmforge.runtime.quantize import pipeline, report

        result = pipeline.run(options)
    except QuantizeError as exc:
        print(f"[lmforge.quantize] error: {exc}", file=sys.stderr, flush=True)
        _termination_message(str(exc))
        return 2
    except (HubError, StorageError) as exc:  # a download or upload: the message names the URI
        print(f"[lmforge.quantize] storage error: {exc}", file=sys.stderr, flush=True)
        _termination_message(str(exc))
        return 1
    except Exception as exc:  # noqa: BLE001 - report any failure the same way, with the traceback in the log
        traceback.print_exc()
        _termination_message(f"{type(exc).__name__}: {exc}")
        return 1
    print(summary_line(result), flush=True)
    print(json.dumps(result), flush=True)
    report.annotate_pod(result)
    return 0
