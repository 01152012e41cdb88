"""prepare(): build, or load and verify, a tokenised corpus in the cache.

A cache entry is a folder ``<root>/data/<corpus>-<tokenizer>-<key>/`` holding ``train.bin``,
``val.bin``, ``test.bin`` (raw token ids, uint16 when the vocab fits, else uint32), for BPE a
``tokenizer.json``, and ``manifest.json``. The key hashes the config and a fingerprint of the
source (for files: names, sizes and modification times), so an edited corpus gets a new entry.

Every file is written under a temporary name and renamed; the manifest is written last and holds
the sha256 of every other file. On load the manifest, the sizes and the hashes are checked; an
entry that fails (missing or truncated file, flipped byte, bad JSON, older format) is rebuilt
with a :class:`CacheWarning`, never used. A lock file serialises processes preparing the same
entry (e.g. several ranks of one job).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from sparseroute.fileio import atomic_path, file_lock, sha256_file

from sparseroute.data.config import DataConfig, default_cache_root
from sparseroute.data.corpus import SEPARATOR, SPLITS, utf8_len
from sparseroute.data.sources import make_source
from sparseroute.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, encode_stream, train_bpe

__all__ = ["TokenizedCorpus", "prepare", "CacheWarning", "FORMAT_VERSION", "entry_dir"]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"


class CacheWarning(UserWarning):
    """A cached corpus was unusable and is being rebuilt."""


@dataclass
class TokenizedCorpus:
    """A prepared corpus: one read-only 1-D memmap of token ids per split (an empty array when a split is empty)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    vocab_size: int
    tokenizer: Tokenizer
    manifest: dict
    directory: Path | None = None

    def split(self, name: str) -> np.ndarray:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}; got {name!r}")
        return getattr(self, name)


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"[sparseroute.data] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Serialise the processes preparing one entry; a read-only cache is loaded unlocked."""
    try:
        held = file_lock(lock_path)
    except OSError:
        yield
        return
    with held:
        yield


def _key_fields(cfg: DataConfig, fingerprint: dict[str, Any]) -> dict[str, Any]:
    return {
        "corpus": cfg.corpus,
        "source": fingerprint,
        "tokenizer": cfg.tokenizer,
        "bpe_vocab_size": cfg.bpe_vocab_size if cfg.tokenizer == "bpe" else None,
        "val_fraction": cfg.val_fraction,
        "test_fraction": cfg.test_fraction,
        "max_bytes": cfg.max_bytes,
        "separator": SEPARATOR,
    }


def _key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def entry_dir(cfg: DataConfig, key: str) -> Path:
    readable = cfg.corpus.replace("text:", "text-").replace("hf:", "hf-")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", readable)[-48:].strip("_.")
    return default_cache_root(cfg.cache_dir) / "data" / f"{slug}-{cfg.tokenizer}-{key[:16]}"


def _dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _open_bin(path: Path, dtype: np.dtype, n: int) -> np.ndarray:
    if n == 0:  # np.memmap cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


# -- loading -------------------------------------------------------------------------------------


def _check(directory: Path, key: str) -> tuple[dict | None, str | None]:
    """(manifest, None) when the entry is complete and intact, else (None, why it is not)."""
    mpath = directory / MANIFEST
    if not mpath.exists():
        return None, "it has no manifest.json (an interrupted build?)"
    try:
        m = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"manifest.json is unreadable ({e})"
    if not isinstance(m, dict) or m.get("format_version") != FORMAT_VERSION:
        found = m.get("format_version") if isinstance(m, dict) else None
        return None, f"manifest.json has format version {found!r}, this code writes {FORMAT_VERSION}"
    if m.get("key") != key:
        return None, "manifest.json was written for a different corpus or config"
    try:
        dtype = np.dtype(m["dtype"])
        sp = m["splits"]
        files = [(directory / sp[s]["file"], sp[s]["tokens"] * dtype.itemsize, sp[s]["sha256"]) for s in SPLITS]
        if m["tokenizer"] == "bpe":
            files.append((directory / TOKENIZER_FILE, None, m["tokenizer_sha256"]))
    except (KeyError, TypeError) as e:
        return None, f"manifest.json lacks a field ({e})"
    for path, size, sha in files:
        if not path.exists():
            return None, f"{path.name} is missing"
        if size is not None and path.stat().st_size != size:
            return None, f"{path.name} has {path.stat().st_size} bytes, the manifest says {size}"
        if sha256_file(path) != sha:
            return None, f"{path.name} does not match its sha256 in the manifest"
    return m, None


def _load(directory: Path, m: dict) -> TokenizedCorpus:
    dtype = np.dtype(m["dtype"])
    arrays = {s: _open_bin(directory / m["splits"][s]["file"], dtype, m["splits"][s]["tokens"]) for s in SPLITS}
    tok: Tokenizer = BPETokenizer(directory / TOKENIZER_FILE) if m["tokenizer"] == "bpe" else ByteTokenizer()
    if tok.vocab_size != m["vocab_size"]:
        raise ValueError(f"{directory}: tokenizer vocab {tok.vocab_size} != manifest vocab_size {m['vocab_size']}")
    return TokenizedCorpus(**arrays, vocab_size=m["vocab_size"], tokenizer=tok, manifest=m, directory=directory)


# -- building ------------------------------------------------------------------------------------


def _write_split(path: Path, chunks: Iterator[np.ndarray], dtype: np.dtype) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for arr in chunks:
            raw = np.ascontiguousarray(arr, dtype=dtype).tobytes()
            f.write(raw)
            h.update(raw)
            n += len(arr)
    return n, h.hexdigest()


def _counting(texts: Iterator[str], stats: dict[str, int]) -> Iterator[str]:
    for t in texts:
        stats["documents"] += 1
        stats["bytes"] += utf8_len(t)
        yield t


def _build(cfg: DataConfig, source, fields: dict[str, Any], key: str, directory: Path, progress: bool) -> dict:
    t0 = time.perf_counter()
    plan = source.plan(cfg, lambda msg: _say(progress, msg))
    directory.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (directory / MANIFEST).unlink()  # the old manifest must not vouch for new files
    manifest: dict[str, Any] = {"format_version": FORMAT_VERSION, "key": key, **{k: v for k, v in fields.items()}}
    if cfg.tokenizer == "bpe":
        if not plan.splits["train"]:
            raise ValueError(f"corpus {cfg.corpus!r}: the train split is empty, so there is nothing to train BPE on")
        _say(progress, f"training byte-level BPE (vocab {cfg.bpe_vocab_size}) on the train split")
        with atomic_path(directory / TOKENIZER_FILE) as tmp:
            train_bpe(plan.iter_texts("train"), cfg.bpe_vocab_size, tmp, progress=progress)
        tok: ByteTokenizer | BPETokenizer = BPETokenizer(directory / TOKENIZER_FILE)
        manifest["tokenizer_sha256"] = sha256_file(directory / TOKENIZER_FILE)
    else:
        tok = ByteTokenizer()
    dtype = _dtype(tok.vocab_size)
    splits: dict[str, Any] = {}
    for s in SPLITS:
        _say(progress, f"tokenising {s}: {len(plan.splits[s])} documents with {tok.name}")
        stats = {"documents": 0, "bytes": 0}
        ids = encode_stream(tok, _counting(plan.iter_texts(s), stats), SEPARATOR)
        n, sha = _write_split(directory / f"{s}.bin", ids, dtype)
        splits[s] = {"file": f"{s}.bin", "tokens": n, "sha256": sha, "documents": stats["documents"],
                     "text_bytes": stats["bytes"], "truncated_by_max_bytes": plan.truncated[s]}
    manifest.update(
        tokenizer_name=tok.name,
        vocab_size=tok.vocab_size,
        dtype=dtype.name,
        split_method=plan.method,
        splits=splits,
        source_info=plan.info,
        build_seconds=round(time.perf_counter() - t0, 3),
    )
    if plan.list_files:
        manifest["files"] = {s: [p.name for p in plan.splits[s]] for s in SPLITS}
    _say(progress, "writing cache: " + ", ".join(f"{s} {splits[s]['tokens']:,} tokens" for s in SPLITS))
    with atomic_path(directory / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
    return manifest


def prepare(cfg: DataConfig, *, progress: bool = False) -> TokenizedCorpus:
    """Tokenise ``cfg.corpus`` into the cache, or load it from there after verifying it."""
    if not isinstance(cfg, DataConfig):
        raise ValueError(f"prepare() needs a DataConfig; got {type(cfg).__name__}")
    source = make_source(cfg)
    fields = _key_fields(cfg, source.fingerprint())
    key = _key(fields)
    directory = entry_dir(cfg, key)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the data cache folder {directory.parent} ({e}); set cache_dir or "
                         f"$SPARSEROUTE_CACHE to a writable folder") from e
    with _locked(directory.parent / f"{directory.name}.lock"):
        if directory.exists():
            m, why = _check(directory, key)
            if m is not None:
                _say(progress, f"using cached {cfg.corpus} ({cfg.tokenizer}) at {directory}")
                return _load(directory, m)
            warnings.warn(f"sparseroute.data: the cached corpus at {directory} is unusable: {why}; rebuilding it",
                          CacheWarning, stacklevel=2)
        _say(progress, f"preparing {cfg.corpus} ({cfg.tokenizer}) in {directory}")
        try:
            m = _build(cfg, source, fields, key, directory, progress)
        except OSError as e:
            raise OSError(e.errno, f"cannot write the prepared corpus to {directory} ({e}); make room there, or set "
                                   f"cache_dir (or $SPARSEROUTE_CACHE) to a writable folder with space") from e
        return _load(directory, m)
