"""Incremental detokenizer: UTF-8 split over tokens, SentencePiece-style spaces, stop strings."""

from __future__ import annotations

import pytest

from lmforge.runtime.engine.detokenizer import IncrementalDetokenizer
from lmforge.runtime.models.tiny import build_tokenizer


@pytest.fixture(scope="module")
def bpe():
    return build_tokenizer()


@pytest.fixture(scope="module")
def sentencepiece_like():
    """A Llama-2-style tokenizer: Unigram pieces with "▁" for spaces and <0xNN> byte fallback."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)]
    pieces += [(f"<0x{b:02X}>", -20.0) for b in range(256)]
    pieces += [(w, -1.0) for w in ["▁Hello", "▁world", "▁the", "▁cat", "▁", "!", "▁ok", "s"]]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyzHW"]
    tok = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def stream(tokenizer, prompt_ids, output_ids, **kw):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, **kw)
    deltas, seen = [], []
    for t in output_ids:
        before = detok.text
        stop = detok.update(t)
        deltas.append(detok.text[len(before) :])
        seen.append(detok.output_text(finished=False))
        if stop is not None:
            return detok, deltas, seen, stop
    return detok, deltas, seen, detok.flush()


@pytest.mark.parametrize("text", ["Hello 🙂 world 🚀🎉 ok", "日本語のテキスト。中文文本。👍🏽 café", "ab❤️c"])
def test_multibyte_utf8_deltas_concatenate_to_final_text(bpe, text):
    ids = bpe.encode(text, add_special_tokens=False)
    prompt = bpe.encode("Q:")
    assert len(ids) > len(text.encode()) // 4  # really split into byte-level pieces
    detok, deltas, _, _ = stream(bpe, prompt, ids)
    assert "".join(deltas) == detok.text == text
    assert not any("\ufffd" in d for d in deltas)


def test_incomplete_character_is_flushed_at_the_end(bpe):
    ids = bpe.encode("ok 🙂", add_special_tokens=False)
    detok, deltas, _, _ = stream(bpe, [], ids[:-1])  # ends half way through the emoji
    assert detok.text == bpe.decode(ids[:-1]) and detok.text.endswith("\ufffd")


def test_sentencepiece_leading_spaces(sentencepiece_like):
    tok = sentencepiece_like
    ids = tok.encode("Hello world the cats! ok 日本", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids[:2]) == ["▁Hello", "▁world"]
    assert any(t.startswith("<0x") for t in tok.convert_ids_to_tokens(ids))  # byte fallback in play
    full = tok.decode(ids)
    texts = []
    for split in (1, 2, 4):
        detok, deltas, _, _ = stream(tok, ids[:split], ids[split:])
        assert "".join(deltas) == detok.text == full[len(tok.decode(ids[:split])) :]
        texts.append(detok.text)
    assert texts[1] == " the cats! ok 日本"  # the space of the first output piece "▁the" survives


def test_stop_string_is_cut_and_never_streamed(bpe):
    ids = bpe.encode("one two STOP three", add_special_tokens=False)
    detok, _, seen, stop = stream(bpe, [], ids, stop=["STOP", "never"])
    assert stop == "STOP" and detok.text == "one two "
    for partial in seen:  # what a streaming client saw is always a prefix of the final text
        assert detok.text.startswith(partial)
    assert detok.output_text(finished=True) == "one two "


def test_earliest_stop_string_wins_and_spans_tokens(bpe):
    ids = bpe.encode("abcdefgh", add_special_tokens=False)
    detok, _, _, stop = stream(bpe, [], ids, stop=["fg", "cde"])
    assert stop == "cde" and detok.text == "ab"


def test_skip_special_tokens(bpe):
    ids = bpe.encode("hi", add_special_tokens=False) + [bpe.eos_token_id]
    assert stream(bpe, [], ids)[0].text == "hi"
    assert stream(bpe, [], ids, skip_special_tokens=False)[0].text == "hi</s>"
