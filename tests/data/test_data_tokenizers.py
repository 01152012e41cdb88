"""Tokenizers round-trip exactly; BPE trains on the train split only and is deterministic."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sparseroute.data import BPETokenizer, ByteTokenizer, DataConfig, Tokenizer, prepare
from sparseroute.data.corpus import SEPARATOR, SPLITS

_any_text = st.text(st.characters(exclude_categories=()), max_size=200)  # any code point, surrogates included


@settings(max_examples=300, deadline=None)
@given(text=_any_text)
@example(text="")
@example(text="lone \ud800 surrogate \udfff")
@example(text="\x00\r\n\u2028\U0010ffff")
def test_bytes_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


def test_bytes_are_utf8_and_decode_never_raises():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer) and tok.vocab_size == 256 and tok.name == "bytes"
    assert tok.encode("aé🙂") == list("aé🙂".encode())
    assert tok.decode([0xE6, 0x9D]) == "\ufffd"  # a cut multi-byte character (as a model may sample)
    with pytest.raises(ValueError, match="256"):
        tok.decode([300])


def _prepare_bpe(root, cache, vocab=320):
    return prepare(DataConfig(corpus=f"text:{root}", tokenizer="bpe", bpe_vocab_size=vocab, cache_dir=str(cache),
                              val_fraction=0.2, test_fraction=0.2))


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    pytest.importorskip("tokenizers")
    import random

    rng = random.Random(1)
    words = ["router", "expert", "tokens", "sparse", "gating", "naïve", "東京", "🙂", "λ"]
    words += ["    return x\n", "def f(x):\n"]
    root = tmp_path_factory.mktemp("bpe-corpus")
    for i in range(10):
        (root / f"f{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(3000)), encoding="utf-8")
    return root, _prepare_bpe(root, tmp_path_factory.mktemp("bpe-cache"))


def test_bpe_basics(bpe):
    _, c = bpe
    tok = c.tokenizer
    assert isinstance(tok, BPETokenizer) and isinstance(tok, Tokenizer)
    assert 256 < tok.vocab_size <= 320 and c.vocab_size == tok.vocab_size
    assert c.train.dtype == np.uint16
    assert len(tok.encode("router expert tokens")) < len("router expert tokens")  # merges were learned
    assert (c.directory / "tokenizer.json").exists()


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_bpe_round_trip(bpe, text):
    tok = bpe[1].tokenizer
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_bpe_splits_decode_to_the_text(bpe):
    root, c = bpe
    for s in SPLITS:
        expect = SEPARATOR.join((root / f).read_text(encoding="utf-8") for f in c.manifest["files"][s])
        assert c.tokenizer.decode(c.split(s).tolist()) == expect


def test_bpe_is_deterministic_and_reused(bpe, tmp_path):
    root, c = bpe
    again = _prepare_bpe(root, tmp_path)
    assert again.manifest["tokenizer_sha256"] == c.manifest["tokenizer_sha256"]
    for s in SPLITS:
        np.testing.assert_array_equal(np.asarray(again.split(s)), np.asarray(c.split(s)))
    mtime = (again.directory / "tokenizer.json").stat().st_mtime_ns
    third = _prepare_bpe(root, tmp_path)
    assert (third.directory / "tokenizer.json").stat().st_mtime_ns == mtime
    assert third.tokenizer.encode("sparse gating") == c.tokenizer.encode("sparse gating")


def test_bpe_trains_on_train_split_only(tmp_path):
    pytest.importorskip("tokenizers")
    root = tmp_path / "corpus"
    root.mkdir()
    filler = "common words here " * 200
    for i in range(6):
        (root / f"f{i}.txt").write_text(filler, encoding="utf-8")
    c0 = _prepare_bpe(root, tmp_path / "c0", vocab=400)
    rare = ("zyxwvutsrq " * 400)[: len(filler)]  # same size, so the split does not move

    def with_rare_word_in(split: str, cache: str):
        for i in range(6):
            (root / f"f{i}.txt").write_text(filler, encoding="utf-8")
        name = c0.manifest["files"][split][0]
        (root / name).write_text(rare, encoding="utf-8")
        c = _prepare_bpe(root, tmp_path / cache, vocab=400)
        assert name in c.manifest["files"][split]
        return c

    assert len(with_rare_word_in("train", "c1").tokenizer.encode(" zyxwvutsrq")) == 1  # learned from train
    assert len(with_rare_word_in("test", "c2").tokenizer.encode(" zyxwvutsrq")) > 3  # never seen: not merged


def test_bpe_without_tokenizers_says_so(monkeypatch, tmp_path, text_dir):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ValueError, match="`tokenizers` package"):
        prepare(DataConfig(corpus=f"text:{text_dir}", tokenizer="bpe", bpe_vocab_size=300, cache_dir=str(tmp_path)))


def test_another_bpe_vocabulary_is_another_cache_entry(bpe, tmp_path):
    root, _ = bpe
    small, large = _prepare_bpe(root, tmp_path, vocab=290), _prepare_bpe(root, tmp_path, vocab=310)
    assert small.directory != large.directory and (small.vocab_size, large.vocab_size) == (290, 310)
    mtime = (small.directory / "tokenizer.json").stat().st_mtime_ns
    again = _prepare_bpe(root, tmp_path, vocab=290)  # the first entry is still there, and reused
    assert again.directory == small.directory and (again.directory / "tokenizer.json").stat().st_mtime_ns == mtime
