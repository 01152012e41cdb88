"""Corpora, tokenizers and batches for the lab.

``prepare(DataConfig(...))`` tokenises a corpus into a verified on-disk cache and returns a
:class:`TokenizedCorpus` of read-only memmaps; ``get_batch`` draws deterministic, resumable
training batches from a split and ``eval_batches`` walks one in order.

The default corpus, ``"stdlib"``, is the running Python's standard library, so the lab works with
no download. See :mod:`sparseroute.data.corpus` for how splits are cut.
"""

from sparseroute.data.batches import (
    epoch_permutation,
    eval_batches,
    eval_windows,
    get_batch,
    num_windows,
    unigram_entropy,
)
from sparseroute.data.cache import CacheWarning, TokenizedCorpus, prepare
from sparseroute.data.config import DataConfig
from sparseroute.data.sources import stdlib_files
from sparseroute.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer

__all__ = [
    "DataConfig",
    "TokenizedCorpus",
    "Tokenizer",
    "ByteTokenizer",
    "BPETokenizer",
    "CacheWarning",
    "prepare",
    "get_batch",
    "eval_batches",
    "eval_windows",
    "unigram_entropy",
    "num_windows",
    "epoch_permutation",
    "stdlib_files",
]
