"""Calibration and held-out data, and the layer-by-layer walk GPTQ and AWQ share.

Data: JSON Lines with "text" (or chat "messages") per line, tokenized into one stream (EOS between
rows) and cut into `samples` sequences of `seq_len` tokens; the tokens after them are the held-out
text of the quality report, so the two never overlap.

Layer walk: one forward per sample stops at the first decoder layer and records its inputs (hidden
states + the kwargs the model passes: position embeddings, masks). Each layer then runs on those
inputs (hooks collect what the method needs), gets quantized in place, and runs again to produce the
next layer's inputs: later layers calibrate on the outputs of already-quantized earlier ones.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.runtime.quantize.config import QuantizeError

# Held-out text when no data is given (RTN/FP8 without --calibration): plain prose, no repetition.
BUILTIN_EVAL_TEXT = """\
The river bends twice before it reaches the town, and each spring the water rises to the stone wall
that the first settlers built. Children walk along the top of the wall on their way to school, and the
baker on the corner opens his shutters before sunrise so that the smell of bread reaches the bridge.
A quantized model stores its weights with fewer bits: four or eight instead of sixteen. The scales that
map the small integers back to real numbers are kept per output channel or per group of inputs, and
a good method chooses them so that the layer's outputs change as little as possible.
In the library, the catalogue lists books by author, by title and by subject. Visitors may borrow up to
five books for three weeks; maps and rare editions stay in the reading room, where the light is softer.
Operators reconcile what users declare with what the cluster runs: when a pod fails, the controller
records the reason, emits an event and decides whether to retry, so that the status always says why.
She counted the steps to the lighthouse: one hundred and twelve, then a narrow ladder, then the lamp.
From there the ships looked like toys, and the coast curved north into a haze of salt and sunlight.
"""


@dataclass(slots=True)
class TextData:
    calibration: list[torch.Tensor]  # [1, seq_len] token ids each
    evaluation: list[torch.Tensor]  # [1, <= eval_seq_len] token ids each
    eval_source: str  # where the held-out text came from


def read_jsonl(path: str | Path, tokenizer: Any) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise QuantizeError(f"calibration file {path} does not exist")
    texts = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise QuantizeError(f"{path}:{number}: not JSON ({exc})") from None
            texts.append(_row_text(row, tokenizer, f"{path}:{number}"))
    if not texts:
        raise QuantizeError(f"{path} has no rows")
    return texts


def _row_text(row: Any, tokenizer: Any, where: str) -> str:
    if isinstance(row, dict) and isinstance(row.get("text"), str):
        return row["text"]
    if isinstance(row, dict) and isinstance(row.get("messages"), list):
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(row["messages"], tokenize=False)
        return "\n".join(str(m.get("content", "")) for m in row["messages"])
    raise QuantizeError(f'{where}: expected {{"text": ...}} or {{"messages": [...]}}')


def token_stream(texts: list[str], tokenizer: Any) -> list[int]:
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"]
        if eos is not None:
            stream.append(eos)
    return stream


def chunks(stream: list[int], count: int, length: int, allow_short: bool = False) -> list[torch.Tensor]:
    """Up to `count` consecutive [1, length] pieces of `stream` (a shorter last piece if allow_short)."""
    out: list[torch.Tensor] = []
    for start in range(0, len(stream), length):
        piece = stream[start : start + length]
        if len(out) == count or (len(piece) < length and not (allow_short and len(piece) > 1)):
            break
        out.append(torch.tensor([piece], dtype=torch.long))
    return out


def load_text_data(
    tokenizer: Any,
    *,
    calibration: str | None,
    samples: int,
    seq_len: int,
    eval_dataset: str | None,
    eval_samples: int,
    eval_seq_len: int,
    log: Callable[[str], None] = print,
) -> TextData:
    calib: list[torch.Tensor] = []
    leftover: list[int] = []
    if calibration:
        stream = token_stream(read_jsonl(calibration, tokenizer), tokenizer)
        calib = chunks(stream, samples, seq_len)
        if not calib:
            raise QuantizeError(
                f"{calibration} holds {len(stream)} tokens, fewer than one --seq-len {seq_len} sample"
            )
        if len(calib) < samples:
            log(
                f"[lmforge.quantize] calibration data gives {len(calib)} samples of {seq_len} tokens "
                f"(asked for {samples})"
            )
        leftover = stream[len(calib) * seq_len :]
    if eval_dataset:
        evaluation = chunks(
            token_stream(read_jsonl(eval_dataset, tokenizer), tokenizer),
            eval_samples,
            eval_seq_len,
            allow_short=True,
        )
        source = str(eval_dataset)
    elif len(leftover) >= eval_seq_len:
        evaluation, source = chunks(leftover, eval_samples, eval_seq_len), f"{calibration} (held out)"
    else:
        stream = tokenizer(BUILTIN_EVAL_TEXT, add_special_tokens=False)["input_ids"]
        evaluation, source = chunks(stream, eval_samples, eval_seq_len, allow_short=True), "built-in text"
    return TextData(calibration=calib, evaluation=evaluation, eval_source=source)


# --- the layer walk -----------------------------------------------------------------------------------


class _StopForward(Exception):
    pass


@dataclass(slots=True)
class LayerInput:
    hidden: torch.Tensor  # [1, T, hidden]
    args: tuple[Any, ...]  # further positional args of the layer call
    kwargs: dict[str, Any]  # position embeddings, attention mask, ...


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of decoder layers (the longest ModuleList named `*layers`)."""
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks") and len(m)
    ]
    if not found:
        raise QuantizeError("cannot find the decoder layers of this model (no ModuleList named 'layers')")
    return max(found, key=lambda item: len(item[1]))


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, first_layer: nn.Module, samples: list[torch.Tensor], device: torch.device
) -> list[LayerInput]:
    captured: list[LayerInput] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if args:
            hidden, rest = args[0], args[1:]
        else:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        captured.append(LayerInput(hidden.detach(), tuple(rest), dict(kwargs)))
        raise _StopForward

    handle = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in samples:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: list[LayerInput]) -> list[LayerInput]:
    """The layer's outputs as the next layer's inputs (same kwargs)."""
    out: list[LayerInput] = []
    for item in inputs:
        result = layer(item.hidden, *item.args, **item.kwargs)
        hidden = result[0] if isinstance(result, tuple | list) else result
        out.append(LayerInput(hidden, item.args, item.kwargs))
    return out
