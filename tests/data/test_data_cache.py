"""The prepared-corpus cache: reused when intact, rebuilt with a warning when not, never silently used."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from sparseroute.data import CacheWarning, DataConfig, prepare
from sparseroute.data.cache import FORMAT_VERSION
from sparseroute.data.corpus import SPLITS


def _cfg(text_dir, tmp_path, **kw):
    return DataConfig(corpus=f"text:{text_dir}", cache_dir=str(tmp_path / "cache"), val_fraction=0.2,
                      test_fraction=0.2, **kw)


def _copy(c):
    return {s: np.array(c.split(s)) for s in SPLITS}


def _same(c, arrays):
    return all(np.array_equal(np.asarray(c.split(s)), arrays[s]) for s in SPLITS)


def _mtimes(directory):
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}


def test_second_prepare_reuses_the_cache(text_dir, tmp_path):
    first = prepare(_cfg(text_dir, tmp_path))
    before = _mtimes(first.directory)
    assert {"train.bin", "val.bin", "test.bin", "manifest.json"} <= set(before)
    assert not [n for n in before if ".tmp-" in n]  # no temporary files left behind
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = prepare(_cfg(text_dir, tmp_path))
    assert second.directory == first.directory and _mtimes(second.directory) == before
    assert _same(second, _copy(first))
    assert isinstance(second.train, np.memmap) and not second.train.flags.writeable
    with pytest.raises(ValueError):
        second.train[0] = 1


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))


def _stale(path):
    m = json.loads(path.read_text())
    m["format_version"] = FORMAT_VERSION - 1
    path.write_text(json.dumps(m))


@pytest.mark.parametrize(
    "target,damage,why",
    [
        ("train.bin", _truncate, "train.bin has .* bytes"),
        ("val.bin", _flip, "val.bin does not match its sha256"),
        ("test.bin", lambda p: p.unlink(), "test.bin is missing"),
        ("manifest.json", lambda p: p.write_text("{not json"), "manifest.json is unreadable"),
        ("manifest.json", _stale, "format version"),
        ("manifest.json", lambda p: p.unlink(), "no manifest"),
    ],
)
def test_damaged_cache_is_rebuilt_with_a_warning(text_dir, tmp_path, target, damage, why):
    first = prepare(_cfg(text_dir, tmp_path))
    good = _copy(first)
    del first  # drop the memmaps before damaging their files
    directory = prepare(_cfg(text_dir, tmp_path)).directory
    damage(directory / target)
    with pytest.warns(CacheWarning, match=why):
        rebuilt = prepare(_cfg(text_dir, tmp_path))
    assert _same(rebuilt, good)
    assert rebuilt.manifest["format_version"] == FORMAT_VERSION
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _same(prepare(_cfg(text_dir, tmp_path)), good)  # and the rebuilt entry is sound


def test_damaged_bpe_tokenizer_is_rebuilt(text_dir, tmp_path):
    pytest.importorskip("tokenizers")
    cfg = _cfg(text_dir, tmp_path, tokenizer="bpe", bpe_vocab_size=300)
    first = prepare(cfg)
    sample = first.tokenizer.encode("route the token")
    (first.directory / "tokenizer.json").write_text("{}")
    with pytest.warns(CacheWarning, match="tokenizer.json"):
        again = prepare(cfg)
    assert again.tokenizer.encode("route the token") == sample


def test_a_changed_corpus_gets_a_new_entry(text_dir, tmp_path):
    first = prepare(_cfg(text_dir, tmp_path))
    name = first.manifest["files"]["val"][0]
    (text_dir / name).write_text("changed text\n", encoding="utf-8")
    second = prepare(_cfg(text_dir, tmp_path))
    assert second.directory != first.directory
    text = "".join(second.tokenizer.decode(second.split(s).tolist()) for s in SPLITS)
    assert "changed text" in text


def test_config_fields_change_the_entry(text_dir, tmp_path):
    dirs = {prepare(_cfg(text_dir, tmp_path)).directory,
            prepare(_cfg(text_dir, tmp_path, max_bytes=500)).directory,
            prepare(DataConfig(corpus=f"text:{text_dir}", cache_dir=str(tmp_path / "cache"))).directory}
    assert len(dirs) == 3


def test_empty_split_and_env_cache(text_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEROUTE_CACHE", str(tmp_path / "env"))
    c = prepare(DataConfig(corpus=f"text:{text_dir}", test_fraction=0.0))
    assert c.directory.is_relative_to(tmp_path / "env")
    assert len(c.test) == 0 and c.test.dtype == np.uint16 and len(c.val) > 0
    assert c.manifest["files"]["test"] == []
    assert prepare(DataConfig(corpus=f"text:{text_dir}", test_fraction=0.0)).directory == c.directory


def test_progress_goes_to_stderr_only_when_asked(text_dir, tmp_path, capsys):
    prepare(_cfg(text_dir, tmp_path))
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    prepare(_cfg(text_dir, tmp_path / "other"), progress=True)
    out = capsys.readouterr()
    assert out.out == ""
    assert "reading 9 files" in out.err and "tokenising train" in out.err and "writing cache" in out.err
    prepare(_cfg(text_dir, tmp_path / "other"), progress=True)
    assert "using cached" in capsys.readouterr().err


def test_concurrent_prepares_agree(text_dir, tmp_path, monkeypatch):
    """Several workers (e.g. ranks of one job) preparing the same entry: one builds, all get it intact."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    import sparseroute.data.cache as cache_mod

    builds = []
    real_build = cache_mod._build

    def slow_build(*args, **kwargs):
        builds.append(1)
        time.sleep(0.3)  # widen the window in which an unlocked second worker would also build
        return real_build(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "_build", slow_build)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: prepare(_cfg(text_dir, tmp_path)), range(4)))
    assert len(builds) == 1
    ref = _copy(results[0])
    assert all(r.directory == results[0].directory and _same(r, ref) for r in results)
    assert not [p for p in results[0].directory.iterdir() if ".tmp-" in p.name]


def test_read_only_cache_still_loads(text_dir, tmp_path):
    import os

    first = prepare(_cfg(text_dir, tmp_path))
    data = first.directory.parent
    (data / f"{first.directory.name}.lock").unlink()
    os.chmod(data, 0o555)
    try:
        if os.access(data, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        assert _same(prepare(_cfg(text_dir, tmp_path)), _copy(first))
    finally:
        os.chmod(data, 0o755)


def test_cache_inside_the_corpus_folder_is_not_read(text_dir):
    cfg = DataConfig(corpus=f"text:{text_dir}", cache_dir=str(text_dir / "cache"))
    first = prepare(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = prepare(cfg)  # the manifest written inside the corpus must not change its key
    assert second.directory == first.directory
    assert not any(f.startswith("cache/") for s in SPLITS for f in second.manifest["files"][s])
