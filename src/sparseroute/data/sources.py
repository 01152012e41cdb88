"""Where text comes from: the Python standard library, local text files, or a Hugging Face dataset.

Each source gives a cheap ``fingerprint()`` (what the cache key hashes; for files a listing of
names, sizes and modification times, so nothing is read to find a cache hit) and a ``plan()``
(the documents of each split, read lazily; see :mod:`sparseroute.data.corpus`).
"""

from __future__ import annotations

import abc

import hashlib
import os
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sparseroute.data.config import DataConfig, default_cache_root
from sparseroute.data.corpus import (
    SEPARATOR,
    SPLITS,
    CorpusPlan,
    Piece,
    assign_by_file,
    cap_pieces,
    split_budgets,
    split_by_range,
    utf8_len,
)

__all__ = ["FileEntry", "stdlib_root", "stdlib_files", "text_files", "make_source", "Source"]

# Folders of the standard library that are not library code (or not ours to train on).
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"})

Say = Callable[[str], None]


@dataclass(frozen=True)
class FileEntry:
    """A file of a corpus: ``name`` is its path relative to the corpus root, with '/' separators."""

    name: str
    path: Path
    size: int
    mtime_ns: int


def _entry(root: Path, path: Path) -> FileEntry:
    st = path.stat()
    return FileEntry(path.relative_to(root).as_posix(), path, st.st_size, st.st_mtime_ns)


def stdlib_root() -> Path:
    """The running Python's standard-library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[FileEntry]:
    """The standard library's ``.py`` files, sorted by name, without tests, idlelib and site-packages."""
    root = stdlib_root() if root is None else Path(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS and not d.startswith(".")]
        for f in filenames:
            if f.endswith(".py"):
                out.append(_entry(root, Path(dirpath, f)))
    return sorted(out, key=lambda e: e.name)


def text_files(path: Path, exclude: Path | None = None) -> list[FileEntry]:
    """``path`` itself if it is a file, else every non-hidden file under it, sorted by name.

    ``exclude`` (the cache root) is left out, so a cache kept inside the corpus folder is not read.
    """
    if path.is_file():
        return [_entry(path.parent, path)]
    out = []
    skip = exclude.resolve() if exclude is not None else None
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [
            d for d in dirnames
            if not d.startswith(".") and d != "__pycache__" and Path(dirpath, d).resolve() != skip
        ]
        out.extend(_entry(path, Path(dirpath, f)) for f in filenames if not f.startswith("."))
    return sorted((e for e in out if e.path.is_file()), key=lambda e: e.name)


def _read_text(path: Path) -> str | None:
    """The file's text, or None when it is empty, binary (has NUL bytes) or not UTF-8."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if not raw or b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _listing_hash(entries: list[FileEntry]) -> str:
    h = hashlib.sha256()
    for e in entries:
        h.update(f"{e.name}\0{e.size}\0{e.mtime_ns}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def _file_pieces(entries: list[FileEntry], say: Say) -> tuple[list[Piece], list[str]]:
    """Read every file once to keep the UTF-8 text ones; their text is read again when tokenised."""
    say(f"reading {len(entries)} files")
    pieces, skipped = [], []
    for e in entries:
        text = _read_text(e.path)
        if text is None:
            skipped.append(e.name)
            continue
        pieces.append(Piece(e.name, utf8_len(text), (lambda p=e.path: p.read_bytes().decode("utf-8", "replace"))))
    return pieces, skipped


def _cap(splits: dict[str, list[Piece]], cfg: DataConfig) -> tuple[dict[str, list[Piece]], dict[str, bool]]:
    budgets = split_budgets(cfg.max_bytes, cfg.val_fraction, cfg.test_fraction)
    capped, truncated = {}, {}
    for s in SPLITS:
        capped[s], truncated[s] = cap_pieces(splits[s], budgets[s])
    return capped, truncated


class Source(abc.ABC):
    """Where a corpus's text comes from."""

    @abc.abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """What identifies the content (for the cache key)."""

    @abc.abstractmethod
    def plan(self, cfg: DataConfig, say: Say) -> CorpusPlan:
        """The documents of each split."""


class FilesSource(Source):
    """The standard library, or ``text:PATH``."""

    def __init__(self, kind: str, root: Path, entries: list[FileEntry], spec: str):
        self.kind, self.root, self.entries, self.spec = kind, root, entries, spec

    def fingerprint(self) -> dict[str, Any]:
        listing = _listing_hash(self.entries)
        return {"kind": self.kind, "root": str(self.root), "files": len(self.entries), "listing": listing}

    def plan(self, cfg: DataConfig, say: Say) -> CorpusPlan:
        pieces, skipped = _file_pieces(self.entries, say)
        info: dict[str, Any] = {"root": str(self.root), "files_listed": len(self.entries)}
        info.update(files_skipped=skipped[:50], files_skipped_count=len(skipped))
        if self.kind == "stdlib":
            info["python"] = platform.python_version()
        if not pieces:
            raise ValueError(
                f"corpus {self.spec!r}: {self.root} holds no UTF-8 text ({len(self.entries)} files, all empty, "
                f"binary or not UTF-8); point 'text:PATH' at a text file or a folder of text files"
            )
        if len(pieces) >= 3:
            splits, method = assign_by_file(pieces, cfg.val_fraction, cfg.test_fraction), "by_file"
        else:
            text = SEPARATOR.join(p.load() for p in pieces)
            name = "+".join(p.name for p in pieces)
            splits, method = split_by_range(text, name, cfg.val_fraction, cfg.test_fraction), "by_range"
        splits, truncated = _cap(splits, cfg)
        return CorpusPlan(splits=splits, method=method, info=info, list_files=True, truncated=truncated)


_HF_ADVICE = (
    "install it with `pip install 'sparseroute[data]'` (or `pip install datasets`), or pre-download the "
    "dataset on a machine with internet access (datasets.load_dataset(...) fills ~/.cache/huggingface; copy it "
    "over and set HF_DATASETS_OFFLINE=1), or export its text to files and use corpus='text:PATH'"
)
_VAL_NAMES = ("validation", "valid", "val", "dev")


def _import_datasets(spec: str) -> Any:
    try:
        import datasets  # noqa: PLC0415  (optional dependency, imported only when asked for)
    except ImportError as e:
        raise ValueError(
            f"corpus {spec!r} needs the optional `datasets` package, which is not installed: {_HF_ADVICE}"
        ) from e
    return datasets


class HFSource(Source):
    """``hf:NAME[:CONFIG]``, through the optional ``datasets`` package; loaded once, on first use."""

    def __init__(self, spec: str, name: str, config: str | None):
        self.spec, self.name, self.config = spec, name, config
        self._dd: Any = None
        self._column: str | None = None

    def _load(self) -> Any:
        if self._dd is not None:
            return self._dd
        datasets = _import_datasets(self.spec)
        try:
            dd = datasets.load_dataset(self.name, self.config) if self.config else datasets.load_dataset(self.name)
        except Exception as e:  # noqa: BLE001  (any failure to get the data has the same remedies)
            offline = os.environ.get("HF_DATASETS_OFFLINE", "") not in ("", "0")
            why = " (HF_DATASETS_OFFLINE is set, so only a local copy can be used)" if offline else ""
            raise ValueError(
                f"corpus {self.spec!r}: could not load Hugging Face dataset {self.name!r}"
                f"{f' config {self.config!r}' if self.config else ''}{why}: {type(e).__name__}: {e}. "
                f"Check the name and config; or {_HF_ADVICE}"
            ) from e
        if not hasattr(dd, "keys") or "train" not in dd.keys():
            splits = list(dd.keys()) if hasattr(dd, "keys") else type(dd).__name__
            raise ValueError(f"corpus {self.spec!r}: the dataset has no 'train' split (it has {splits})")
        self._dd = dd
        self._column = self._text_column(dd["train"])
        return dd

    def _text_column(self, ds: Any) -> str:
        cols = list(ds.column_names)
        if "text" in cols:
            return "text"
        if len(ds) > 0:
            for c in cols:
                if isinstance(ds[0][c], str):
                    return c
        raise ValueError(f"corpus {self.spec!r}: no text column in the train split (columns: {cols})")

    def _val_name(self) -> str | None:
        return next((n for n in _VAL_NAMES if n in self._dd.keys()), None)

    def fingerprint(self) -> dict[str, Any]:
        dd = self._load()
        splits = {}
        for s in sorted(dd.keys()):
            ds = dd[s]
            fp = getattr(ds, "_fingerprint", None)
            if fp is None:
                joined = "\0".join(str(t) for t in ds[self._column])
                fp = hashlib.sha256(joined.encode("utf-8", "surrogatepass")).hexdigest()
            splits[s] = [len(ds), str(fp)]
        return {"kind": "hf", "name": self.name, "config": self.config, "column": self._column, "splits": splits}

    def _pieces(self, split: str) -> list[Piece]:
        texts = self._dd[split][self._column]
        return [
            Piece(f"{split}/{i}", utf8_len(t), (lambda t=t: t)) for i, t in enumerate(texts) if isinstance(t, str) and t
        ]

    def plan(self, cfg: DataConfig, say: Say) -> CorpusPlan:
        self._load()
        say(f"reading Hugging Face dataset {self.name}{':' + self.config if self.config else ''}")
        val_name = self._val_name()
        have_test = "test" in self._dd.keys()
        train = self._pieces("train")
        # Splits the dataset lacks are carved from its train split, by row, like files.
        carved = assign_by_file(
            train, 0.0 if val_name else cfg.val_fraction, 0.0 if have_test else cfg.test_fraction
        )
        splits = {
            "train": carved["train"],
            "val": self._pieces(val_name) if val_name else carved["val"],
            "test": self._pieces("test") if have_test else carved["test"],
        }
        method = "given" if (val_name and have_test) else "given+carved"
        info = {
            "name": self.name,
            "config": self.config,
            "column": self._column,
            "val_split": val_name or "carved from train",
            "test_split": "test" if have_test else "carved from train",
        }
        if not any(splits.values()):
            raise ValueError(f"corpus {self.spec!r}: column {self._column!r} holds no text")
        splits, truncated = _cap(splits, cfg)
        return CorpusPlan(splits=splits, method=method, info=info, list_files=False, truncated=truncated)


def make_source(cfg: DataConfig) -> Source:
    """The source for ``cfg.corpus``; raises ValueError when a text path does not exist."""
    spec = cfg.corpus_spec
    if spec.kind == "stdlib":
        root = stdlib_root()
        return FilesSource("stdlib", root, stdlib_files(root), cfg.corpus)
    if spec.kind == "text":
        path = Path(spec.path).expanduser()
        if not path.exists():
            raise ValueError(
                f"corpus {cfg.corpus!r}: path {str(path)!r} does not exist (resolved against the current folder "
                f"{os.getcwd()!r}); give an existing text file or folder of text files"
            )
        path = path.resolve()
        entries = text_files(path, exclude=default_cache_root(cfg.cache_dir))
        if not entries:
            raise ValueError(f"corpus {cfg.corpus!r}: folder {str(path)!r} holds no files; put text files in it")
        return FilesSource("text", path, entries, cfg.corpus)
    return HFSource(cfg.corpus, spec.name, spec.config)
