"""The one place where a run's corpus is prepared and the model's vocabulary is fitted to it."""

from __future__ import annotations

import json
from dataclasses import replace

from sparseroute.data import DataConfig, TokenizedCorpus, prepare
from sparseroute.train.config import RunConfig

__all__ = ["prepare_run", "corpus_for"]


def corpus_for(data: DataConfig, *, corpora: dict[str, TokenizedCorpus] | None = None,
               progress: bool = True) -> TokenizedCorpus:
    """The prepared corpus of ``data`` (tokenised into the cache, or loaded from it and verified),
    taken from / kept in ``corpora`` when given, so that the runs of a sweep prepare each corpus
    once."""
    key = json.dumps(data.to_dict(), sort_keys=True)
    if corpora is not None and key in corpora:
        return corpora[key]
    corpus = prepare(data, progress=progress)
    if corpora is not None:
        corpora[key] = corpus
    return corpus


def prepare_run(cfg: RunConfig, *, corpora: dict[str, TokenizedCorpus] | None = None,
                progress: bool = True) -> tuple[RunConfig, TokenizedCorpus]:
    """The run's corpus, and the run with its model's vocabulary set to the tokenizer's (the
    presets say 256, the byte vocabulary; a BPE corpus decides its own size)."""
    corpus = corpus_for(cfg.data, corpora=corpora, progress=progress)
    if cfg.model.vocab_size != corpus.vocab_size:
        cfg = replace(cfg, model=cfg.model.replace(vocab_size=corpus.vocab_size))
    return cfg, corpus
