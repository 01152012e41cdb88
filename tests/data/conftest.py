"""Shared fixtures for the data tests: small generated text corpora and a capped stdlib corpus."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from sparseroute.data import DataConfig, prepare

_WORDS = ("route", "expert", "token", "sparse", "gate", "λ", "naïve", "東京", "🙂", "def", "return", "x_TD", "\t")
_WORDS += ("",)


def write_text_corpus(root: Path, n_files: int, *, seed: int = 0, lines: int = 40) -> list[str]:
    """Write ``n_files`` deterministic UTF-8 text files (some in subfolders) and return their names."""
    rng = random.Random(seed)
    names = []
    for i in range(n_files):
        name = f"doc{i:02d}.txt" if i % 3 else f"sub/part{i:02d}.md"
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        body = "\n".join(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 12))) for _ in range(lines + 7 * i))
        path.write_text(f"# file {i}\n{body}\n", encoding="utf-8")
        names.append(name)
    return sorted(names)


@pytest.fixture
def text_dir(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    write_text_corpus(root, 9)
    return root


@pytest.fixture(scope="session")
def stdlib_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stdlib-cache")


@pytest.fixture(scope="session")
def stdlib_small(stdlib_cache):
    """The stdlib corpus capped at 2 MB of text, bytes tokenizer."""
    return prepare(DataConfig(cache_dir=str(stdlib_cache), max_bytes=2_000_000))


@pytest.fixture(scope="session")
def stdlib_full(stdlib_cache):
    """The whole stdlib corpus, bytes tokenizer (about 11 MB; prepares in well under a second)."""
    return prepare(DataConfig(cache_dir=str(stdlib_cache)))


@pytest.fixture
def make_text_corpus():
    """``make_text_corpus(root, n_files, seed=0, lines=40) -> names``: write a generated text corpus."""
    return write_text_corpus
