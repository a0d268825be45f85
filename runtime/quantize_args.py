"""`lmforge quantize` arguments. Stdlib only (no torch), so `lmforge --help` stays fast.

lmforge quantize --model IN --method w4a16-gptq --calibration calib.jsonl --output OUT
"""

from __future__ import annotations

import argparse

METHODS = ("w8a16", "w4a16-rtn", "w4a16-gptq", "w4a16-awq", "fp8")
CALIBRATED_METHODS = ("w4a16-gptq", "w4a16-awq")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _group_size(text: str) -> int:
    value = int(text)
    if value != -1 and value < 1:
        raise argparse.ArgumentTypeError(
            f"must be -1 (one scale per output channel) or positive, got {value}"
        )
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def add_quantize_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the quantizer's flags to `parser` and returns it."""
    job = parser.add_argument_group("job")
    job.add_argument(
        "--model",
        required=True,
        metavar="PATH",
        help="HF checkpoint directory to quantize (or hf://org/name, downloaded)",
    )
    job.add_argument(
        "--method",
        required=True,
        choices=METHODS,
        help="w8a16: int8 per output channel; w4a16-rtn|gptq|awq: int4 in groups "
        "(round-to-nearest, GPTQ, AWQ); fp8: float8 e4m3 weights per channel, "
        "dynamic per-token fp8 activations",
    )
    job.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="output directory: a compressed-tensors checkpoint that transformers, vLLM "
        "and `lmforge serve` load",
    )
    job.add_argument(
        "--group-size",
        type=_group_size,
        default=None,
        help="weights per scale along the input dim (w4a16 default: 128; w8a16 default: "
        "-1 = one scale per output channel)",
    )
    job.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="NAME",
        help="module left in high precision: its name or re:<regex> (repeatable; lm_head is always kept)",
    )

    calib = parser.add_argument_group("calibration (required for w4a16-gptq and w4a16-awq)")
    calib.add_argument(
        "--calibration",
        metavar="FILE",
        help='JSON Lines, one {"text": ...} (or {"messages": [...]}) per line',
    )
    calib.add_argument(
        "--samples", type=_positive_int, default=128, help="calibration sequences (default: 128)"
    )
    calib.add_argument(
        "--seq-len", type=_positive_int, default=512, help="tokens per calibration sequence (default: 512)"
    )
    calib.add_argument(
        "--act-order",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="GPTQ: quantize columns in order of decreasing activation energy, with "
        "group scales fixed up front (static: the checkpoint needs no g_idx; default: on)",
    )
    calib.add_argument(
        "--damp",
        type=_fraction,
        default=0.01,
        help="GPTQ: dampening added to the Hessian diagonal, as a fraction of its mean (default: 0.01)",
    )

    report = parser.add_argument_group("quality report")
    report.add_argument(
        "--eval-dataset",
        metavar="FILE",
        help="held-out JSON Lines for KL / top-1 agreement (default: the calibration "
        "file's tokens after the calibration samples, else a built-in text)",
    )
    report.add_argument(
        "--eval-samples", type=_positive_int, default=8, help="held-out sequences (default: 8)"
    )
    report.add_argument(
        "--eval-seq-len", type=_positive_int, default=128, help="tokens per held-out sequence (default: 128)"
    )
    report.add_argument(
        "--no-eval",
        dest="eval",
        action="store_false",
        help="skip the KL / top-1 comparison (sizes are still reported)",
    )

    run = parser.add_argument_group("execution")
    run.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    run.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="dtype of the written scales and unquantized tensors (auto: the checkpoint's)",
    )
    run.add_argument("--seed", type=int, default=0, help="seed for calibration subsampling (default: 0)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge quantize", description="Quantize an HF checkpoint into compressed-tensors."
    )
    return add_quantize_arguments(parser)
