"""get_batch / eval_batches / unigram_entropy against the written rules and hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sparseroute.data import epoch_permutation, eval_batches, eval_windows, get_batch, num_windows, unigram_entropy

S, B = 7, 5
W = S + 1


def _tokens(n_windows: int, extra: int = 3) -> np.ndarray:
    # Token value = its position, so a row tells which window it came from.
    return np.arange(n_windows * W + extra, dtype=np.uint32)


def _window_ids(x: torch.Tensor) -> list[int]:
    assert (x[:, 0] % W == 0).all()
    return (x[:, 0] // W).tolist()


def test_shapes_dtypes_and_shift():
    toks = _tokens(23)
    x, y = get_batch(toks, B, S, step=3, seed=0)
    assert x.shape == y.shape == (B, S) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    # Each row with its last target is one whole window, tokens[k*W : (k+1)*W].
    for row_x, row_y in zip(x, y):
        k = int(row_x[0]) // W
        assert torch.equal(torch.cat([row_x, row_y[-1:]]), torch.arange(k * W, (k + 1) * W))


def test_matches_the_written_rule():
    toks = _tokens(23)
    n, seed = 23, 11
    order = np.concatenate([np.random.Generator(np.random.PCG64([seed, e])).permutation(n) for e in range(4)])
    for step in range(15):  # 75 windows: crosses three epoch boundaries, mid-batch
        x, _ = get_batch(toks, B, S, step, seed)
        assert _window_ids(x) == order[step * B : (step + 1) * B].tolist()


def test_deterministic_and_resume_is_exact():
    toks = np.random.default_rng(0).integers(0, 256, size=5000).astype(np.uint16)
    run = [get_batch(toks, B, S, i, seed=7) for i in range(30)]
    # A run resumed at step 17 (fresh process state, other calls in between) continues identically.
    get_batch(toks, 3, 4, 99, seed=1)
    resumed = [get_batch(toks, B, S, i, seed=7) for i in range(17, 30)]
    for (xa, ya), (xb, yb) in zip(run[17:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    backwards = [get_batch(toks, B, S, i, seed=7) for i in reversed(range(30))][::-1]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(run, backwards))


def test_different_seeds_differ():
    toks = _tokens(200)
    a = [_window_ids(get_batch(toks, B, S, i, seed=0)[0]) for i in range(4)]
    b = [_window_ids(get_batch(toks, B, S, i, seed=1)[0]) for i in range(4)]
    assert a != b


@pytest.mark.parametrize("n_windows,batch", [(20, 5), (23, 5), (3, 8), (1, 1)])
def test_each_epoch_uses_every_window_once(n_windows, batch):
    toks = _tokens(n_windows)
    assert num_windows(len(toks), S) == n_windows
    steps = math.ceil(3 * n_windows / batch)
    seen = [w for i in range(steps) for w in _window_ids(get_batch(toks, batch, S, i, seed=5)[0])]
    for e in range(3):
        epoch = seen[e * n_windows : (e + 1) * n_windows]
        assert sorted(epoch) == list(range(n_windows)), e
        assert epoch == epoch_permutation(n_windows, 5, e).tolist()
    if n_windows > 2:
        assert seen[:n_windows] != seen[n_windows : 2 * n_windows]  # each epoch reshuffles


def test_the_tail_past_the_last_window_is_never_used():
    toks = _tokens(4, extra=W - 1)
    used = {int(t) for i in range(10) for t in torch.cat(get_batch(toks, 2, S, i, seed=0)).flatten()}
    assert max(used) == 4 * W - 1


def test_get_batch_bad_input():
    toks = _tokens(2)
    with pytest.raises(ValueError, match="seq_len"):
        get_batch(toks[:W - 1], 1, S, 0, 0)
    for kw, name in [({"batch_size": 0}, "batch_size"), ({"seq_len": 0}, "seq_len"), ({"step": -1}, "step"),
                     ({"seed": -3}, "seed"), ({"step": 1.0}, "step")]:
        args = {"batch_size": 2, "seq_len": S, "step": 0, "seed": 0, **kw}
        with pytest.raises(ValueError, match=name):
            get_batch(toks, **args)
    with pytest.raises(ValueError, match="1-D"):
        get_batch(toks[:18].reshape(2, -1), 1, 2, 0, 0)


def test_get_batch_on_a_memmap(tmp_path):
    arr = np.arange(1000, dtype=np.uint16)
    arr.tofile(tmp_path / "t.bin")
    mm = np.memmap(tmp_path / "t.bin", dtype=np.uint16, mode="r", shape=(1000,))
    xa, ya = get_batch(mm, 4, 9, 2, 3)
    xb, yb = get_batch(arr, 4, 9, 2, 3)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)


# -- eval_batches --------------------------------------------------------------------------------


def test_eval_batches_cover_every_target_once_in_order():
    toks = np.arange(103, dtype=np.uint16)  # (103 - 1) // 7 = 14 windows, 4 tokens dropped at the end
    batches = list(eval_batches(toks, 4, S))
    assert [x.shape[0] for x, _ in batches] == [4, 4, 4, 2]
    xs = torch.cat([x for x, _ in batches]).flatten()
    ys = torch.cat([y for _, y in batches]).flatten()
    assert torch.equal(ys, torch.arange(1, 14 * S + 1))
    assert torch.equal(xs, torch.arange(0, 14 * S))
    again = list(eval_batches(toks, 4, S))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))


def test_eval_batches_max_tokens_spread_over_the_split_and_errors():
    toks = np.arange(1000, dtype=np.uint16)  # (1000 - 1) // 7 = 142 windows
    batches = list(eval_batches(toks, 3, S, max_tokens=50))  # room for (50 - 1) // 7 = 7 of them
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    starts = xs[:, 0].tolist()
    assert len(starts) == 7 and starts == [i * S for i in eval_windows(1000, S, 50) // S]
    assert starts[0] == 0 and starts[-1] == 141 * S  # the first and the last window of the split
    gaps = np.diff(np.array(starts) // S)
    assert gaps.min() >= 1 and gaps.max() - gaps.min() <= 1  # evenly spread, no window twice
    assert torch.equal(ys, xs + 1)  # each row: S consecutive targets
    assert torch.equal(xs, torch.stack([torch.arange(s0, s0 + S) for s0 in starts]))
    # a budget of the whole split (or more) scores every window
    assert eval_windows(1000, S, 10_000).tolist() == [i * S for i in range(142)]
    with pytest.raises(ValueError, match="seq_len\\+1"):
        eval_batches(toks[:S], 2, S)  # raised at the call, not at the first next()
    with pytest.raises(ValueError, match="max_tokens"):
        eval_batches(toks, 2, S, max_tokens=0)


def test_evaluation_windows_represent_every_part_of_a_split(tmp_path):
    """A split stored file by file: the evaluated windows reach its first and its last file, and
    they are the same whoever asks (no seed enters)."""
    from sparseroute.data import DataConfig, prepare

    folder = tmp_path / "text"
    folder.mkdir()
    for k in range(26):  # file k is one letter, repeated
        (folder / f"{k:02d}.txt").write_text(chr(ord("a") + k) * 400)
    corpus = prepare(DataConfig(corpus=f"text:{folder}", cache_dir=str(tmp_path / "c"), val_fraction=0.3,
                                test_fraction=0.3), progress=False)
    for split in (corpus.val, corpus.test):
        letters = [t for t in dict.fromkeys(int(v) for v in split) if chr(t).isalpha()]
        assert len(letters) >= 4  # several files in the split
        seen = {int(v) for x, y in eval_batches(split, 4, 16, max_tokens=16 * 8 + 1) for v in torch.cat([x, y]).flatten()}
        assert letters[0] in seen and letters[-1] in seen
        again = [x for x, _ in eval_batches(split, 4, 16, max_tokens=16 * 8 + 1)]
        first = [x for x, _ in eval_batches(split, 4, 16, max_tokens=16 * 8 + 1)]
        assert all(torch.equal(a, b) for a, b in zip(again, first))


# -- unigram_entropy -----------------------------------------------------------------------------


def test_unigram_entropy_by_hand():
    toks = np.array([0, 0, 1, 2], dtype=np.uint16)  # p = 1/2, 1/4, 1/4
    expect = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert unigram_entropy(toks, 4) == pytest.approx(expect, rel=1e-12)
    assert unigram_entropy(np.array([3, 3, 3], dtype=np.uint16), 4) == 0.0
    assert unigram_entropy(np.arange(256, dtype=np.uint16).repeat(3), 256) == pytest.approx(math.log(256))


def test_unigram_entropy_bad_input():
    with pytest.raises(ValueError, match="vocab_size"):
        unigram_entropy(np.array([0, 5], dtype=np.uint16), 5)
    with pytest.raises(ValueError, match="empty"):
        unigram_entropy(np.zeros(0, dtype=np.uint16), 5)


def test_stdlib_entropy_is_plausible(stdlib_small):
    h = unigram_entropy(stdlib_small.train, stdlib_small.vocab_size)
    assert 2.5 < h < 4.0  # source code bytes: ~3.2 nats; uniform would be ln 256 = 5.5
