"""Training data: JSONL rows -> token ids + labels -> packed rows of `seq_len` -> a deterministic,
rank-sharded order whose position is saved in checkpoints.

Rows are {"text": str} (loss on every token) or {"messages": [{"role", "content"}, ...]} (rendered
with the tokenizer's chat template; loss on assistant tokens only). Packing puts whole samples one
after another into a row; `position_ids` restart at 0 for each sample, which transformers reads as
"packed sequences" and masks attention per sample (no cross-sample attention).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding, first token of a sample)


class DatasetError(ValueError):
    """A dataset row is malformed; the message starts with `file:line`."""


@dataclass(frozen=True, slots=True)
class Sample:
    input_ids: list[int]
    labels: list[int]  # same length; IGNORE_INDEX where no loss


@dataclass(frozen=True, slots=True)
class PackedRows:
    """`num_rows` rows of exactly `seq_len` tokens (plain lists: pure and cheap to test)."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    position_ids: list[list[int]]
    num_tokens: list[int]  # non-padding tokens per row

    def __len__(self) -> int:
        return len(self.input_ids)


# --- reading --------------------------------------------------------------------------------------


def dataset_files(path: Path) -> list[Path]:
    if path.is_dir():
        # The directory's own *.jsonl files; else those below it (a Hugging Face dataset repo keeps
        # them under data/ or per split).
        files = sorted(path.glob("*.jsonl")) or sorted(path.rglob("*.jsonl"))
        if not files:
            raise DatasetError(f"{path}: no *.jsonl files in the directory")
        return files
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    return [path]


def _check_row(row: Any, fmt: str | None, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
    kind = fmt or ("messages" if "messages" in row else "text")
    if kind == "text":
        if not isinstance(row.get("text"), str) or not row["text"]:
            raise DatasetError(
                f'{where}: expected a non-empty string field "text"'
                + ("" if fmt else ' or a "messages" list')
            )
        return {"text": row["text"], "where": where}
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f'{where}: expected a non-empty list field "messages"')
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DatasetError(f'{where}: messages[{i}] must be an object with string "role" and "content"')
    if not any(m["role"] == "assistant" for m in messages):
        raise DatasetError(f"{where}: no assistant message, so nothing to train on")
    return {"messages": messages, "where": where}


def read_rows(path: Path, fmt: str | None = None, max_samples: int | None = None) -> list[dict[str, Any]]:
    """Validated rows of every file, in file then line order; blank lines are skipped. Each row
    keeps its `where` ("file:line") for later error messages."""
    rows: list[dict[str, Any]] = []
    for file in dataset_files(path):
        with file.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{file}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
                rows.append(_check_row(row, fmt, where))
                if max_samples is not None and len(rows) >= max_samples:
                    return rows
    if not rows:
        raise DatasetError(f"{path}: the dataset is empty")
    return rows


# --- tokenizing -----------------------------------------------------------------------------------


def tokenize_text(text: str, tokenizer: Any) -> Sample:
    ids = list(tokenizer(text).input_ids)  # BOS if the tokenizer adds one
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return Sample(ids, list(ids))


def assistant_char_spans(messages: list[dict[str, str]], tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of every assistant turn: the
    text that rendering messages[:i+1] adds to rendering messages[:i] with a generation prompt."""
    render = tokenizer.apply_chat_template
    text = render(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = render(messages[: i + 1], tokenize=False)
        if not (text.startswith(prompt) and text.startswith(upto) and len(prompt) <= len(upto)):
            raise DatasetError(
                "the chat template does not render conversations prefix by prefix, so assistant "
                "turns cannot be located"
            )
        spans.append((len(prompt), len(upto)))
    return text, spans


def tokenize_messages(messages: list[dict[str, str]], tokenizer: Any) -> Sample:
    text, spans = assistant_char_spans(messages, tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc.input_ids)
    labels = [
        t if any(s <= start < e for s, e in spans) else IGNORE_INDEX
        for t, (start, _) in zip(ids, enc.offset_mapping, strict=True)
    ]
    return Sample(ids, labels)


def tokenize_rows(rows: list[dict[str, Any]], tokenizer: Any) -> list[Sample]:
    if tokenizer.chat_template is None and any("messages" in r for r in rows):
        raise DatasetError('the dataset has "messages" rows but the tokenizer has no chat template')
    samples = []
    for row in rows:
        try:
            samples.append(
                tokenize_messages(row["messages"], tokenizer)
                if "messages" in row
                else tokenize_text(row["text"], tokenizer)
            )
        except Exception as exc:  # template errors, bad roles, ...: name the row
            raise DatasetError(f"{row.get('where', '?')}: {exc}") from exc
    return samples


# --- packing --------------------------------------------------------------------------------------


def pack(samples: list[Sample], seq_len: int, pad_id: int) -> PackedRows:
    """Greedy, order-preserving packing of whole samples into rows of `seq_len` tokens. A sample
    longer than `seq_len` is truncated. The first label of every sample is ignored (it would be
    predicted from the previous sample). Samples left without any label are dropped."""
    rows = PackedRows([], [], [], [])
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []

    def close_row() -> None:
        pad = seq_len - len(ids)
        rows.num_tokens.append(len(ids))
        rows.input_ids.append(ids + [pad_id] * pad)
        rows.labels.append(labels + [IGNORE_INDEX] * pad)
        rows.position_ids.append(positions + list(range(pad)))  # padding is a sample of its own

    for sample in samples:
        sample_ids = sample.input_ids[:seq_len]
        sample_labels = [IGNORE_INDEX, *sample.labels[1:seq_len]]
        if all(label == IGNORE_INDEX for label in sample_labels):
            continue
        if len(ids) + len(sample_ids) > seq_len:
            close_row()
            ids, labels, positions = [], [], []
        ids += sample_ids
        labels += sample_labels
        positions += range(len(sample_ids))
    if ids:
        close_row()
    return rows


# --- order ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DataPosition:
    """Where the data stream stands: `micro_step` micro-batches of `epoch` were consumed."""

    epoch: int = 0
    micro_step: int = 0


class ShardedOrder:
    """DistributedSampler-like order: each epoch is a seeded shuffle of all rows; micro-step k of
    rank r takes rows [k*B*W + r*B, k*B*W + (r+1)*B) of it (B batch size, W world size). The
    last incomplete global batch of an epoch is dropped, so every rank steps in lock-step."""

    def __init__(self, num_rows: int, batch_size: int, world_size: int, rank: int, seed: int):
        self.num_rows, self.batch_size, self.world_size, self.rank, self.seed = (
            num_rows,
            batch_size,
            world_size,
            rank,
            seed,
        )
        self.micro_steps_per_epoch = num_rows // (batch_size * world_size)
        self._epoch, self._perm = -1, list[int]()

    def permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            self._perm = list(range(self.num_rows))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(self._perm)
            self._epoch = epoch
        return self._perm

    def indices(self, position: DataPosition) -> list[int]:
        start = (position.micro_step * self.world_size + self.rank) * self.batch_size
        return self.permutation(position.epoch)[start : start + self.batch_size]

    def advance(self, position: DataPosition) -> DataPosition:
        if position.micro_step + 1 >= self.micro_steps_per_epoch:
            return DataPosition(position.epoch + 1, 0)
        return DataPosition(position.epoch, position.micro_step + 1)


def collate(rows: PackedRows, indices: list[int]) -> dict[str, Any]:
    """Tensors of one micro-batch: input_ids / labels / position_ids [B, L], and the token count."""
    import torch

    return {
        "input_ids": torch.tensor([rows.input_ids[i] for i in indices]),
        "labels": torch.tensor([rows.labels[i] for i in indices]),
        "position_ids": torch.tensor([rows.position_ids[i] for i in indices]),
        "num_tokens": sum(rows.num_tokens[i] for i in indices),
    }


def build_packed_rows(
    path: Path, tokenizer: Any, seq_len: int, fmt: str | None = None, max_samples: int | None = None
) -> PackedRows:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pack(tokenize_rows(read_rows(path, fmt, max_samples), tokenizer), seq_len, pad_id)
