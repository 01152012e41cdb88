"""DataConfig validation: every bad value raises ValueError naming the field."""

from __future__ import annotations

import dataclasses
import math

import pytest

from sparseroute.data import DataConfig
from sparseroute.data.config import default_cache_root, parse_corpus


def test_defaults_are_valid_and_offline():
    cfg = DataConfig()
    assert cfg.corpus == "stdlib" and cfg.tokenizer == "bytes"
    assert cfg.to_dict()["val_fraction"] == 0.05


def test_frozen_and_keyword_only():
    cfg = DataConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.corpus = "text:x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        DataConfig("stdlib")  # type: ignore[misc]


@pytest.mark.parametrize(
    "field,value",
    [
        ("corpus", "ftp:somewhere"),
        ("corpus", "wikipedia"),
        ("corpus", "text:"),
        ("corpus", "hf:"),
        ("corpus", "hf:name:"),
        ("corpus", 3),
        ("tokenizer", "wordpiece"),
        ("tokenizer", None),
        ("bpe_vocab_size", 256),
        ("bpe_vocab_size", 0),
        ("bpe_vocab_size", 4096.0),
        ("bpe_vocab_size", True),
        ("val_fraction", -0.1),
        ("val_fraction", 1.0),
        ("val_fraction", math.nan),
        ("val_fraction", True),
        ("val_fraction", "0.1"),
        ("test_fraction", 1.5),
        ("max_bytes", 0),
        ("max_bytes", -5),
        ("max_bytes", 1.5),
        ("cache_dir", 3),
    ],
)
def test_bad_field_raises_naming_it(field, value):
    with pytest.raises(ValueError, match=field) as info:
        DataConfig(**{field: value})
    assert repr(value) in str(info.value) or field == "corpus"


def test_fractions_must_leave_something_to_train_on():
    with pytest.raises(ValueError, match="val_fraction \\+ test_fraction"):
        DataConfig(val_fraction=0.5, test_fraction=0.5)
    DataConfig(val_fraction=0.0, test_fraction=0.0)  # all train is fine


def test_parse_corpus_forms():
    assert parse_corpus("stdlib").kind == "stdlib"
    t = parse_corpus("text:/a/b:c.txt")
    assert (t.kind, t.path) == ("text", "/a/b:c.txt")
    h = parse_corpus("hf:wikitext:wikitext-2-raw-v1")
    assert (h.kind, h.name, h.config) == ("hf", "wikitext", "wikitext-2-raw-v1")
    assert parse_corpus("hf:tiny_shakespeare").config is None


def test_cache_root_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEROUTE_CACHE", str(tmp_path / "env"))
    assert default_cache_root(None) == tmp_path / "env"
    assert default_cache_root(str(tmp_path / "given")) == tmp_path / "given"
    monkeypatch.delenv("SPARSEROUTE_CACHE")
    assert default_cache_root(None).name == "sparseroute"
