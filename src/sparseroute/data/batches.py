"""Batches from a token array: shuffled training windows, evaluation windows spread over a split,
entropy.

Legend: B batch, S sequence length, W = S + 1 window length.

Training: the split is cut into ``n = len(tokens) // W`` non-overlapping windows (the last
``len(tokens) % W`` tokens are never used). Epoch ``e`` visits them in the order
``Generator(PCG64([seed, e])).permutation(n)``; batch ``step`` takes windows ``[step*B, (step+1)*B)``
of the concatenated epochs (a batch may straddle two epochs). So a batch is a pure function of
``(tokens, B, S, step, seed)`` and resuming at any step is exact.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

__all__ = ["get_batch", "eval_batches", "eval_windows", "unigram_entropy", "num_windows", "epoch_permutation"]


def _int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}; got {value!r}")
    return int(value)


def _tokens_1d(tokens: np.ndarray) -> np.ndarray:
    if not isinstance(tokens, np.ndarray) or tokens.ndim != 1:
        raise ValueError(f"tokens must be a 1-D numpy array of token ids; got {type(tokens).__name__} "
                         f"with shape {getattr(tokens, 'shape', None)}")
    return tokens


def num_windows(n_tokens: int, seq_len: int) -> int:
    """How many training windows of ``seq_len + 1`` tokens a split of ``n_tokens`` holds."""
    return n_tokens // (seq_len + 1)


@lru_cache(maxsize=8)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    perm = np.random.Generator(np.random.PCG64([seed, epoch])).permutation(n)
    perm.setflags(write=False)
    return perm


def epoch_permutation(n_windows: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits the ``n_windows`` windows (read-only)."""
    return _permutation(_int("n_windows", n_windows, 1), _int("seed", seed, 0), _int("epoch", epoch, 0))


def get_batch(tokens: np.ndarray, batch_size: int, seq_len: int, step: int, seed: int) -> tuple[Tensor, Tensor]:
    """Training batch ``step``: inputs [B, S] and targets [B, S] (int64, CPU), targets = inputs shifted by one."""
    tokens = _tokens_1d(tokens)
    B = _int("batch_size", batch_size, 1)
    S = _int("seq_len", seq_len, 1)
    step = _int("step", step, 0)
    seed = _int("seed", seed, 0)
    W = S + 1
    n = num_windows(len(tokens), S)
    if n < 1:
        raise ValueError(f"the split has {len(tokens)} tokens, fewer than one window of seq_len+1 = {W}; "
                         f"use a smaller seq_len or a larger corpus (max_bytes, val/test_fraction)")
    g_B = np.arange(step * B, (step + 1) * B, dtype=np.int64)  # global window slots
    epochs_B, pos_B = np.divmod(g_B, n)
    win_B = np.empty(B, dtype=np.int64)
    for e in np.unique(epochs_B):
        sel = epochs_B == e
        win_B[sel] = _permutation(n, seed, int(e))[pos_B[sel]]
    idx_BW = win_B[:, None] * W + np.arange(W, dtype=np.int64)[None, :]
    chunk_BW = torch.from_numpy(np.asarray(tokens[idx_BW]).astype(np.int64))
    return chunk_BW[:, :-1].contiguous(), chunk_BW[:, 1:].contiguous()


def eval_windows(n_tokens: int, seq_len: int, max_tokens: int | None = None) -> np.ndarray:
    """The start offsets of the evaluation windows of a split of ``n_tokens`` tokens.

    The split is cut into ``N = (n_tokens - 1) // S`` consecutive windows of ``S + 1`` tokens
    (window ``i`` is ``tokens[i*S : i*S + S + 1]``: consecutive windows share one token, so every
    target is scored once). When ``max_tokens`` allows fewer windows, ``m = (min(n_tokens,
    max_tokens) - 1) // S``, the ``m`` windows are spread evenly over the whole split (the first,
    the last, and equal steps between), not taken from its start: a split stored file by file is
    then represented by all of its files. The choice depends only on the sizes, never on a seed,
    so every run and seed is scored on the same text."""
    S = _int("seq_len", seq_len, 1)
    n_tok = _int("n_tokens", n_tokens, 0)
    N = (n_tok - 1) // S if n_tok > S else 0
    m = N if max_tokens is None else min(N, max(0, (min(n_tok, _int("max_tokens", max_tokens, 1)) - 1) // S))
    if m < 1:
        offered = n_tok if max_tokens is None else min(n_tok, max_tokens)
        raise ValueError(f"evaluation needs at least seq_len+1 = {S + 1} tokens; the split offers {offered}"
                         f"{'' if max_tokens is None else f' (max_tokens={max_tokens})'}; use a smaller seq_len")
    if m == N:
        return np.arange(N, dtype=np.int64) * S
    # m evenly spaced window indices from 0 to N-1 (distinct, since m < N), in order
    idx = (np.arange(m, dtype=np.int64) * (N - 1)) // max(1, m - 1) if m > 1 else np.zeros(1, dtype=np.int64)
    return idx * S


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int,
                 max_tokens: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Evaluation batches over the windows of :func:`eval_windows` (all of them, or up to
    ``max_tokens`` tokens' worth spread over the whole split), in order. The last batch may have
    fewer than B rows. Raises ValueError at the call when not even one window fits."""
    tokens = _tokens_1d(tokens)
    B = _int("batch_size", batch_size, 1)
    S = _int("seq_len", seq_len, 1)
    starts = eval_windows(len(tokens), S, max_tokens)

    def gen() -> Iterator[tuple[Tensor, Tensor]]:
        offs_W = np.arange(S + 1, dtype=np.int64)
        for first in range(0, len(starts), B):
            starts_B = starts[first:first + B]
            chunk_BW = torch.from_numpy(np.asarray(tokens[starts_B[:, None] + offs_W[None, :]]).astype(np.int64))
            yield chunk_BW[:, :-1].contiguous(), chunk_BW[:, 1:].contiguous()

    return gen()


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy, in nats per token, of the empirical unigram distribution of ``tokens``.

    The loss a model that ignores context could reach; a baseline for the training loss.
    """
    tokens = _tokens_1d(tokens)
    V = _int("vocab_size", vocab_size, 1)
    if len(tokens) == 0:
        raise ValueError("unigram_entropy needs at least one token; got an empty array")
    counts = np.zeros(V, dtype=np.int64)
    step = 1 << 24
    for i in range(0, len(tokens), step):  # in blocks, so a large memmap is never copied whole
        block = np.asarray(tokens[i : i + step])
        lo, hi = int(block.min()), int(block.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"token ids must lie in [0, vocab_size={V}); found {lo if lo < 0 else hi}")
        counts += np.bincount(block, minlength=V)
    p = counts[counts > 0] / len(tokens)
    return float(-(p * np.log(p)).sum()) if len(p) > 1 else 0.0

