"""Data: JSONL validation with file:line errors, chat loss masks, packing, sharded order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.runtime.train.data import (
    IGNORE_INDEX,
    DataPosition,
    DatasetError,
    Sample,
    ShardedOrder,
    collate,
    dataset_files,
    pack,
    read_rows,
    tokenize_messages,
    tokenize_rows,
)

X = IGNORE_INDEX


@pytest.fixture(scope="module")
def tokenizer(helpers):
    return helpers.build_tokenizer()


@pytest.mark.parametrize(
    "line, fmt, message",
    [
        ("{not json", None, "invalid JSON"),
        ('["a"]', None, "expected a JSON object, got list"),
        ('{"txt": "a"}', None, 'expected a non-empty string field "text" or a "messages" list'),
        ('{"text": "a"}', "messages", 'expected a non-empty list field "messages"'),
        (
            '{"messages": [{"role": "user"}]}',
            None,
            'messages\\[0\\] must be an object with string "role" and "content"',
        ),
        ('{"messages": [{"role": "user", "content": "hi"}]}', None, "no assistant message"),
    ],
    ids=["json", "array", "keys", "format", "message", "no-assistant"],
)
def test_bad_row_names_file_and_line(tmp_path: Path, line: str, fmt: str | None, message: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"messages": [{"role": "assistant", "content": "ok"}]}\n\n' + line + "\n")
    with pytest.raises(DatasetError, match=f"^{path}:3: {message}"):
        read_rows(path, fmt)


def test_directory_and_max_samples(tmp_path: Path) -> None:
    for name, texts in (("b.jsonl", ["3", "4"]), ("a.jsonl", ["1", "2"])):
        (tmp_path / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert [r["text"] for r in read_rows(tmp_path)] == ["1", "2", "3", "4"]
    assert [r["where"] for r in read_rows(tmp_path, max_samples=3)][-1] == f"{tmp_path / 'b.jsonl'}:1"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no \\*.jsonl files"):
        read_rows(tmp_path / "empty")
    with pytest.raises(DatasetError, match="no such file"):
        read_rows(tmp_path / "missing.jsonl")


def test_chat_loss_only_on_assistant_tokens(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "say abc"},
        {"role": "assistant", "content": "abc abc"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "one two"},
    ]
    sample = tokenize_messages(messages, tokenizer)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(sample.input_ids) == text
    trained = [t for t, label in zip(sample.input_ids, sample.labels, strict=True) if label != X]
    # Each assistant turn: its content and the end-of-turn token (the template's eos + newline).
    assert tokenizer.decode(trained) == "abc abc</s>\none two</s>\n"
    assert all(label in (X, t) for t, label in zip(sample.input_ids, sample.labels, strict=True))


def test_text_rows_get_bos_and_eos(tokenizer) -> None:
    (sample,) = tokenize_rows([{"text": "abc", "where": "f:1"}], tokenizer)
    assert sample.input_ids[0] == tokenizer.bos_token_id and sample.input_ids[-1] == tokenizer.eos_token_id
    assert sample.labels == sample.input_ids


def test_pack_exact() -> None:
    samples = [
        Sample([1, 2, 3], [1, 2, 3]),
        Sample([4, 5], [X, 5]),
        Sample([6, 7, 8, 9, 10, 11], [6, 7, 8, 9, 10, 11]),
        Sample([12, 13], [X, X]),
    ]
    rows = pack(samples, seq_len=5, pad_id=0)
    assert rows.input_ids == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    assert rows.labels == [[X, 2, 3, X, 5], [X, 7, 8, 9, 10]]  # first token of every sample carries no loss
    assert rows.position_ids == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]
    assert rows.num_tokens == [5, 5]
    padded = pack([Sample([1, 2], [1, 2])], seq_len=4, pad_id=9)
    assert (padded.input_ids, padded.labels, padded.position_ids) == (
        [[1, 2, 9, 9]],
        [[X, 2, X, X]],
        [[0, 1, 0, 1]],
    )
    batch = collate(rows, [1, 0])
    assert batch["input_ids"].tolist() == [[6, 7, 8, 9, 10], [1, 2, 3, 4, 5]] and batch["num_tokens"] == 10


def test_sharded_order_partitions_each_epoch() -> None:
    ranks = [ShardedOrder(num_rows=10, batch_size=2, world_size=2, rank=r, seed=3) for r in range(2)]
    assert ranks[0].micro_steps_per_epoch == 2  # 10 rows // (2 x 2); the last 2 are dropped
    seen = []
    position = DataPosition()
    for _ in range(2):
        seen += ranks[0].indices(position) + ranks[1].indices(position)
        position = ranks[0].advance(position)
    assert position == DataPosition(epoch=1, micro_step=0)
    assert len(set(seen)) == 8 and set(seen) <= set(range(10))
    # Deterministic in (seed, epoch), different across epochs.
    again = ShardedOrder(10, 2, 2, 0, seed=3)
    assert again.indices(DataPosition(0, 1)) == ranks[0].indices(DataPosition(0, 1))
    assert again.permutation(0) != again.permutation(1)
    # One rank with batch 4 sees exactly what two ranks with batch 2 see together.
    single = ShardedOrder(10, 4, 1, 0, seed=3)
    assert single.indices(DataPosition(0, 1)) == ranks[0].indices(DataPosition(0, 1)) + ranks[1].indices(
        DataPosition(0, 1)
    )


def test_dataset_dir_reads_its_own_jsonl_else_those_below(tmp_path: Path) -> None:
    """A Hugging Face dataset snapshot keeps its files under data/ (or one folder per split)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "b.jsonl").write_text("{}\n")
    (tmp_path / "data" / "a.jsonl").write_text("{}\n")
    assert dataset_files(tmp_path) == [tmp_path / "data" / "a.jsonl", tmp_path / "data" / "b.jsonl"]
    (tmp_path / "top.jsonl").write_text("{}\n")
    assert dataset_files(tmp_path) == [tmp_path / "top.jsonl"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no \\*.jsonl files"):
        dataset_files(tmp_path / "empty")
