"""DataConfig: which corpus, which tokenizer, how it is split, where the prepared cache lives."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["DataConfig", "CorpusSpec", "parse_corpus", "TOKENIZERS", "default_cache_root"]

TOKENIZERS = ("bytes", "bpe")
_CORPUS_FORMS = "'stdlib', 'text:PATH' (a text file or a folder of text files) or 'hf:NAME[:CONFIG]'"
# Token ids are stored as uint32 at most.
_MAX_VOCAB = 2**32


@dataclass(frozen=True)
class CorpusSpec:
    """A parsed ``DataConfig.corpus``: ``kind`` is "stdlib", "text" or "hf"."""

    kind: str
    path: str | None = None  # text: the path as given
    name: str | None = None  # hf: dataset name
    config: str | None = None  # hf: dataset config, if any


def parse_corpus(corpus: Any) -> CorpusSpec:
    """Parse a corpus string; raise ValueError naming ``corpus`` when it is malformed."""
    if not isinstance(corpus, str):
        raise ValueError(f"corpus must be a string, one of {_CORPUS_FORMS}; got {corpus!r}")
    if corpus == "stdlib":
        return CorpusSpec(kind="stdlib")
    scheme, sep, rest = corpus.partition(":")
    if sep and scheme == "text":
        if not rest:
            raise ValueError(f"corpus 'text:PATH' needs a PATH after 'text:'; got {corpus!r}")
        return CorpusSpec(kind="text", path=rest)
    if sep and scheme == "hf":
        name, _, config = rest.partition(":")
        if not name:
            raise ValueError(f"corpus 'hf:NAME[:CONFIG]' needs a dataset NAME after 'hf:'; got {corpus!r}")
        if _ and not config:
            raise ValueError(f"corpus 'hf:NAME:CONFIG' has an empty CONFIG; drop the trailing ':' in {corpus!r}")
        return CorpusSpec(kind="hf", name=name, config=config or None)
    raise ValueError(f"corpus must be one of {_CORPUS_FORMS}; got {corpus!r}")


def _fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value < 1.0):
        raise ValueError(f"{name} must be a number in [0, 1); got {value!r}")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where training text comes from and how it becomes token ids.

    corpus: "stdlib" (this Python's standard-library .py files, no download), "text:PATH"
        (a UTF-8 text file, or a folder of them, read recursively), or "hf:NAME[:CONFIG]" (a
        Hugging Face dataset through the optional ``datasets`` package).
    tokenizer: "bytes" (UTF-8 bytes, vocab 256) or "bpe" (byte-level BPE trained on the train
        split with the ``tokenizers`` package, vocab ``bpe_vocab_size``).
    val_fraction / test_fraction: share of the corpus (in bytes of text) held out; a corpus of
        >= 3 files is split by file, a smaller one by contiguous character ranges.
    cache_dir: root of the sparseroute cache; prepared corpora live in ``<root>/data/``.
        None -> $SPARSEROUTE_CACHE, else ~/.cache/sparseroute.
    max_bytes: keep only the first ``max_bytes * fraction`` bytes of text of each split's
        document stream (train gets ``1 - val_fraction - test_fraction``), for quick runs.
    """

    corpus: str = "stdlib"
    tokenizer: str = "bytes"
    bpe_vocab_size: int = 4096
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    cache_dir: str | None = None
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        parse_corpus(self.corpus)
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer must be one of {', '.join(map(repr, TOKENIZERS))}; got {self.tokenizer!r}")
        v = self.bpe_vocab_size
        if isinstance(v, bool) or not isinstance(v, int) or not 257 <= v <= _MAX_VOCAB:
            raise ValueError(
                f"bpe_vocab_size must be an int in [257, 2**32] (256 byte tokens plus at least one merge); got {v!r}"
            )
        _fraction("val_fraction", self.val_fraction)
        _fraction("test_fraction", self.test_fraction)
        if not math.fsum([self.val_fraction, self.test_fraction]) < 1.0:
            raise ValueError(
                f"val_fraction + test_fraction must be < 1 so that something is left to train on; got "
                f"val_fraction={self.val_fraction!r} + test_fraction={self.test_fraction!r}"
            )
        if self.cache_dir is not None and not isinstance(self.cache_dir, (str, os.PathLike)):
            raise ValueError(f"cache_dir must be None or a path string; got {self.cache_dir!r}")
        m = self.max_bytes
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"max_bytes must be None (no cap) or an int >= 1; got {m!r}")

    @property
    def corpus_spec(self) -> CorpusSpec:
        return parse_corpus(self.corpus)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["cache_dir"] is not None:
            d["cache_dir"] = os.fspath(d["cache_dir"])
        return d


def default_cache_root(cache_dir: str | os.PathLike | None) -> Path:
    """The cache root: ``cache_dir``, else $SPARSEROUTE_CACHE, else ~/.cache/sparseroute."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("SPARSEROUTE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "sparseroute"
