"""Corpora: the stdlib listing, deterministic splits disjoint by file, text:PATH, hf: error paths."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseroute.data import DataConfig, prepare, stdlib_files
from sparseroute.data.corpus import SEPARATOR, SPLITS, Piece, assign_by_file, cap_pieces, split_unit
from sparseroute.data.sources import STDLIB_SKIP_DIRS

# -- stdlib --------------------------------------------------------------------------------------


def test_stdlib_listing_is_large_and_filtered():
    files = stdlib_files()
    names = [f.name for f in files]
    assert len(files) > 500
    assert names == sorted(names)
    assert all(n.endswith(".py") for n in names)
    for n in names:
        assert not set(n.split("/")[:-1]) & STDLIB_SKIP_DIRS, n
    assert "os.py" in names and "json/decoder.py" in names
    assert not any(n.startswith("idlelib/") or "/tests/" in n for n in names)


def _split_files(corpus):
    return {s: corpus.manifest["files"][s] for s in SPLITS}


def test_stdlib_splits_are_disjoint_by_file(stdlib_full):
    files = _split_files(stdlib_full)
    sets = {s: set(v) for s, v in files.items()}
    assert all(len(sets[s]) == len(files[s]) for s in SPLITS)  # no file twice in a split
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"] and not sets["val"] & sets["test"]
    listed = {f.name for f in stdlib_files()}
    assert sets["train"] | sets["val"] | sets["test"] <= listed
    # Only undecodable/empty files may be missing from the splits.
    skipped = stdlib_full.manifest["source_info"]["files_skipped_count"]
    assert len(listed) - skipped == sum(len(v) for v in files.values())
    for s in SPLITS:
        assert stdlib_full.manifest["splits"][s]["documents"] == len(files[s]) > 0


def test_stdlib_split_shares_follow_fractions(stdlib_full):
    sizes = {s: stdlib_full.manifest["splits"][s]["text_bytes"] for s in SPLITS}
    total = sum(sizes.values())
    for s in ("val", "test"):
        assert 0.04 < sizes[s] / total <= 0.05 + 1e-9, sizes
    # bytes tokenizer: tokens = text bytes + a separator between documents.
    for s in SPLITS:
        docs = stdlib_full.manifest["splits"][s]["documents"]
        assert len(stdlib_full.split(s)) == sizes[s] + len(SEPARATOR) * (docs - 1)


def test_stdlib_prepare_is_deterministic(stdlib_small, tmp_path):
    again = prepare(DataConfig(cache_dir=str(tmp_path), max_bytes=2_000_000))
    assert again.directory != stdlib_small.directory
    for s in SPLITS:
        np.testing.assert_array_equal(np.asarray(again.split(s)), np.asarray(stdlib_small.split(s)))
    assert _split_files(again) == _split_files(stdlib_small)


def test_max_bytes_samples_whole_documents_of_each_split(stdlib_small, stdlib_full):
    m = stdlib_small.manifest
    root = m["source_info"]["root"]
    for s, budget in zip(SPLITS, [1_800_000, 100_000, 100_000]):
        info = m["splits"][s]
        assert budget - 3 <= info["text_bytes"] <= budget  # the last document is cut at a character boundary
        files = m["files"][s]
        assert set(files) <= set(stdlib_full.manifest["files"][s])
        assert info["truncated_by_max_bytes"] == files[-1]
        texts = [open(f"{root}/{f}", encoding="utf-8").read() for f in files]
        assert all(len(t.encode()) <= budget / 4 for t in texts[:-1])  # no file dominates the sample
        got = stdlib_small.tokenizer.decode(stdlib_small.split(s).tolist())
        whole = SEPARATOR.join(texts[:-1]) + SEPARATOR
        assert got.startswith(whole) and texts[-1].startswith(got[len(whole):])
        assert len(files) > 10


# -- split rules ---------------------------------------------------------------------------------


def _pieces(sizes):
    return [Piece(f"f{i}", n, lambda: "") for i, n in enumerate(sizes)]


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 10_000), min_size=3, max_size=60),
    val=st.sampled_from([0.0, 0.05, 0.1, 0.3]),
    test=st.sampled_from([0.0, 0.05, 0.2, 0.45]),
)
def test_assign_by_file_partitions(sizes, val, test):
    out = assign_by_file(_pieces(sizes), val, test)
    names = [p.name for s in SPLITS for p in out[s]]
    assert sorted(names) == sorted(f"f{i}" for i in range(len(sizes)))  # a partition
    assert out["train"]
    total = sum(sizes)
    for s, frac in (("val", val), ("test", test)):
        got = sum(p.nbytes for p in out[s])
        if frac == 0:
            assert not out[s]
        else:
            assert out[s]
            assert got <= frac * total or len(out[s]) == 1  # never over its share, but for a forced single file
        units = [split_unit(p.name) for p in out[s]]
        assert units == sorted(units)  # hash order within a split


def test_cap_pieces_cuts_at_character_boundary():
    p = Piece("a", len("aé東".encode()), lambda: "aé東")
    kept, cut = cap_pieces([p], 4)  # 'a'=1, 'é'=2, '東'=3 bytes: 4 bytes end inside '東'
    assert cut == "a" and [k.load() for k in kept] == ["aé"]
    kept, cut = cap_pieces([p, p], 100)
    assert cut is None and len(kept) == 2
    big = Piece("big", 40, lambda: "x" * 40)
    kept, cut = cap_pieces([big, p, p], 40)  # big > 40/4 is passed over, then fills what is left
    assert cut == "big" and [k.name for k in kept] == ["a", "a", "big"] and kept[-1].load() == "x" * 28
    kept, cut = cap_pieces([big, p, p], 70)  # what is left holds all of big
    assert cut is None and [k.name for k in kept] == ["a", "a", "big"] and kept[-1].load() == "x" * 40


# -- text:PATH -----------------------------------------------------------------------------------


def test_text_folder_splits_by_file(text_dir, tmp_path):
    (text_dir / "image.bin").write_bytes(bytes(range(256)) * 4)  # not UTF-8: skipped
    (text_dir / ".hidden.txt").write_text("never read")
    cfg = DataConfig(corpus=f"text:{text_dir}", cache_dir=str(tmp_path / "c"), val_fraction=0.2, test_fraction=0.2)
    c = prepare(cfg)
    m = c.manifest
    assert m["split_method"] == "by_file"
    files = _split_files(c)
    all_files = sorted(f for s in SPLITS for f in files[s])
    assert all_files == sorted(p.relative_to(text_dir).as_posix() for p in text_dir.rglob("*.*")
                               if p.suffix in (".txt", ".md") and not p.name.startswith("."))
    assert all(files[s] for s in SPLITS)
    assert m["source_info"]["files_skipped"] == ["image.bin"]
    # The text of each split is its files joined by the separator, in the recorded order.
    for s in SPLITS:
        expect = SEPARATOR.join((text_dir / f).read_text(encoding="utf-8") for f in files[s])
        assert c.tokenizer.decode(c.split(s).tolist()) == expect


def test_single_text_file_splits_by_range(tmp_path):
    text = "".join(f"line {i}: naïve λ 東京\n" for i in range(1000))
    path = tmp_path / "one.txt"
    path.write_text(text, encoding="utf-8")
    c = prepare(DataConfig(corpus=f"text:{path}", cache_dir=str(tmp_path / "c"), val_fraction=0.1, test_fraction=0.2))
    assert c.manifest["split_method"] == "by_range"
    parts = [c.tokenizer.decode(c.split(s).tolist()) for s in SPLITS]
    assert "".join(parts) == text
    n = len(text)
    assert [len(p) for p in parts] == [round(n * 0.7), round(n * 0.8) - round(n * 0.7), n - round(n * 0.8)]


def test_text_path_missing_raises(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        prepare(DataConfig(corpus=f"text:{tmp_path / 'nope'}", cache_dir=str(tmp_path)))


def test_text_folder_without_text_raises(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        prepare(DataConfig(corpus=f"text:{empty}", cache_dir=str(tmp_path / "c")))
    (empty / "a.bin").write_bytes(b"\x00\x01\x02")
    (empty / "b.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="no UTF-8 text"):
        prepare(DataConfig(corpus=f"text:{empty}", cache_dir=str(tmp_path / "c")))


# -- hf: -----------------------------------------------------------------------------------------


def test_hf_without_datasets_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(ValueError, match="datasets") as info:
        prepare(DataConfig(corpus="hf:wikitext:wikitext-2-raw-v1", cache_dir=str(tmp_path)))
    assert "sparseroute[data]" in str(info.value) and "text:PATH" in str(info.value)


class _FakeDataset:
    def __init__(self, texts, fingerprint):
        self._rows = [{"text": t, "id": i} for i, t in enumerate(texts)]
        self.column_names = ["id", "text"]
        self._fingerprint = fingerprint

    def __len__(self):
        return len(self._rows)

    def __getitem__(self, key):
        return [r[key] for r in self._rows] if isinstance(key, str) else self._rows[key]


def _fake_datasets(splits, calls):
    def load_dataset(name, config=None):
        calls.append((name, config))
        if name == "offline/missing":
            raise ConnectionError("Couldn't reach the Hub (offline mode is enabled)")
        return {s: _FakeDataset(t, f"fp-{s}") for s, t in splits.items()}

    return types.SimpleNamespace(load_dataset=load_dataset)


def test_hf_uses_the_datasets_own_splits(monkeypatch, tmp_path):
    train = [f"train row {i} ✓" for i in range(50)] + [""]
    splits = {"train": train, "validation": ["val a", "val b"], "test": ["test z"]}
    calls = []
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(splits, calls))
    c = prepare(DataConfig(corpus="hf:someone/tiny:cfg", cache_dir=str(tmp_path)))
    assert calls[0] == ("someone/tiny", "cfg")
    assert c.manifest["split_method"] == "given"
    assert c.tokenizer.decode(c.val.tolist()) == "val a\n\nval b"
    assert c.tokenizer.decode(c.test.tolist()) == "test z"
    assert c.manifest["splits"]["train"]["documents"] == 50  # the empty row is dropped
    # Cached: a second prepare finds the entry without rebuilding.
    again = prepare(DataConfig(corpus="hf:someone/tiny:cfg", cache_dir=str(tmp_path)))
    assert again.directory == c.directory


def test_hf_carves_missing_splits_from_train(monkeypatch, tmp_path):
    rows = [f"row {i} " * (1 + i % 7) for i in range(200)]
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets({"train": rows}, []))
    c = prepare(DataConfig(corpus="hf:only/train", cache_dir=str(tmp_path), val_fraction=0.1, test_fraction=0.1))
    assert c.manifest["split_method"] == "given+carved"
    docs = {s: c.manifest["splits"][s]["documents"] for s in SPLITS}
    assert sum(docs.values()) == 200 and docs["val"] > 5 and docs["test"] > 5


def test_hf_unavailable_offline_raises(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets({}, []))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match="could not load Hugging Face dataset 'offline/missing'") as info:
        prepare(DataConfig(corpus="hf:offline/missing", cache_dir=str(tmp_path)))
    assert "HF_DATASETS_OFFLINE" in str(info.value) and "pre-download" in str(info.value)
