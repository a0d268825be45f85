"""The quality report: sizes, KL divergence and top-1 agreement of next-token distributions of the
quantized model vs the original on held-out text, duration. Written as quantization_report.json next
to the checkpoint, printed, and (in a QuantizeJob pod) put on the pod as the `lmforge.dev/result`
annotation, which the operator folds into QuantizeJob.status.result.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ANNOTATION_RESULT = "lmforge.dev/result"
REPORT_FILE = "quantization_report.json"
RESULT_KEYS = ("sizeBytesBefore", "sizeBytesAfter", "klDivergence", "top1Agreement", "outputPath")


@torch.no_grad()
def next_token_logprobs(
    model: nn.Module, sequences: list[torch.Tensor], device: torch.device
) -> list[torch.Tensor]:
    """log p(next token) at every position of every sequence: [T, vocab] fp32 on the CPU each."""
    out = []
    for ids in sequences:
        logits = model(input_ids=ids.to(device), use_cache=False).logits[0]
        out.append(logits.float().log_softmax(-1).cpu())
    return out


def compare(reference: list[torch.Tensor], quantized: list[torch.Tensor]) -> tuple[float, float, int]:
    """(mean KL(reference || quantized) in nats, top-1 agreement, positions) over all positions."""
    kl_sum, agree, positions = 0.0, 0, 0
    for ref, new in zip(reference, quantized, strict=True):
        kl_sum += float((ref.exp() * (ref - new)).sum(-1).clamp_min(0).sum())
        agree += int((ref.argmax(-1) == new.argmax(-1)).sum())
        positions += ref.shape[0]
    if positions == 0:
        return float("nan"), float("nan"), 0
    return kl_sum / positions, agree / positions, positions


def result_payload(report: dict[str, Any]) -> dict[str, Any]:
    """What the operator needs (QuantizeJob.status.result keys)."""
    return {key: report[key] for key in RESULT_KEYS if report.get(key) is not None}


def write_report(out_dir: Path, report: dict[str, Any]) -> Path:
    path = out_dir / REPORT_FILE
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def annotate_pod(report: dict[str, Any], log: Callable[[str], None] = print) -> bool:
    """In a pod (POD_NAME etc. from the downward API, a service account that may patch pods), puts the
    result on the pod; elsewhere does nothing. Reuses the trainer's progress annotator."""
    from lmforge.runtime.train.progress import PodAnnotator

    annotator = PodAnnotator.from_env()
    if annotator is None:
        return False
    try:
        annotator.patch({ANNOTATION_RESULT: json.dumps(result_payload(report), separators=(",", ":"))})
    except Exception as exc:  # noqa: BLE001 - the checkpoint is written; the status just lacks numbers
        log(
            f"[lmforge.quantize] cannot annotate pod {annotator.namespace}/{annotator.pod} with the result: {exc}"
        )
        return False
    return True
