"""Splitting a corpus into train/val/test document streams, and capping them to ``max_bytes``.

A *piece* is one document (a file, a dataset row, or a character range of a single text) with a
known size in UTF-8 bytes and a function that loads its text, so a split can be planned from
sizes alone and read lazily, one document at a time, when it is tokenised.

Rules (all deterministic, none depends on the machine or on time):

* By file (>= 3 documents): documents are ordered by ``split_unit(name)``, a hash of the name
  mapped to [0, 1). Test walks that order taking each document that still fits in
  ``test_fraction`` of the bytes (passing over ones too big), val then does the same with
  what is left for ``val_fraction``, and train takes the rest. A split with a non-zero fraction
  gets at least one document and train always keeps one. Within a split, documents stay in hash
  order, so any prefix of a split is a fair sample of it.
* By range (1-2 documents): the documents are joined and cut into contiguous character ranges,
  train first, then val, then test at the end.
* ``max_bytes``: each split keeps about ``max_bytes * fraction`` bytes (train gets what val and
  test leave): whole documents in stream order while they fit, passing over any larger than a
  quarter of the budget, then the start of the first one passed over (cut at a character
  boundary) to fill the rest. So a capped split holds only documents of the uncapped one, and a
  single huge file cannot become the whole sample.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

__all__ = [
    "SPLITS",
    "SEPARATOR",
    "Piece",
    "CorpusPlan",
    "split_unit",
    "assign_by_file",
    "split_by_range",
    "cap_pieces",
    "split_budgets",
    "utf8_len",
]

SPLITS = ("train", "val", "test")
# Joins the documents of a split into one stream.
SEPARATOR = "\n\n"


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


@dataclass(frozen=True)
class Piece:
    """One document of a split: its name, its size in UTF-8 bytes and how to read its text."""

    name: str
    nbytes: int
    load: Callable[[], str] = field(repr=False, compare=False)


@dataclass
class CorpusPlan:
    """What each split will contain, before any text is read or tokenised.

    method: "by_file", "by_range" or "given" (a dataset's own splits).
    list_files: whether the manifest should list the piece names of each split.
    info: facts about the source for the manifest (root folder, Python version, ...).
    truncated: per split, the name of the piece cut short by ``max_bytes`` (None if none was).
    """

    splits: dict[str, list[Piece]]
    method: str
    info: dict = field(default_factory=dict)
    list_files: bool = True
    truncated: dict[str, str | None] = field(default_factory=lambda: {s: None for s in SPLITS})

    def iter_texts(self, split: str) -> Iterator[str]:
        for piece in self.splits[split]:
            yield piece.load()


def split_unit(name: str) -> float:
    """A document's place in [0, 1): a hash of its name, stable across runs and machines."""
    digest = hashlib.sha256(("sparseroute-split\0" + name).encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_by_file(pieces: list[Piece], val_fraction: float, test_fraction: float) -> dict[str, list[Piece]]:
    """Split whole documents by hash order and byte share (see the module docstring)."""
    left = sorted(pieces, key=lambda p: (split_unit(p.name), p.name))
    total = sum(p.nbytes for p in left)
    out: dict[str, list[Piece]] = {s: [] for s in SPLITS}
    # Documents that must stay behind for the splits still to fill: one for train, one for val.
    plan = (("test", test_fraction, 1 + (val_fraction > 0)), ("val", val_fraction, 1))
    for split, frac, reserve in plan:
        if frac <= 0:
            continue
        target, got = frac * total, 0
        taken: list[Piece] = []
        kept: list[Piece] = []
        for p in left:
            # Take each document that still fits in the split's share; one too big is passed over
            # (it stays for train), so a single huge file cannot become a whole split.
            if got + p.nbytes <= target and len(left) - len(taken) - 1 >= reserve:
                taken.append(p)
                got += p.nbytes
            else:
                kept.append(p)
        if not taken and len(left) > reserve:  # every document is too big: take the first
            taken, kept = [left[0]], left[1:]
        out[split], left = taken, kept
    out["train"] = left
    return out


def split_by_range(text: str, name: str, val_fraction: float, test_fraction: float) -> dict[str, list[Piece]]:
    """Cut one text into contiguous character ranges: train, then val, then test."""
    n = len(text)
    val_start = round(n * (1.0 - val_fraction - test_fraction))
    test_start = round(n * (1.0 - test_fraction))
    bounds = {"train": (0, val_start), "val": (val_start, test_start), "test": (test_start, n)}
    out: dict[str, list[Piece]] = {}
    for split, (a, b) in bounds.items():
        part = text[a:b]
        out[split] = [Piece(f"{name}[{a}:{b}]", utf8_len(part), (lambda s=part: s))] if part else []
    return out


def split_budgets(max_bytes: int | None, val_fraction: float, test_fraction: float) -> dict[str, float]:
    """Bytes of text each split may keep under ``max_bytes`` (inf when uncapped)."""
    if max_bytes is None:
        return {s: float("inf") for s in SPLITS}
    val, test = round(max_bytes * val_fraction), round(max_bytes * test_fraction)
    return {"train": max_bytes - val - test, "val": val, "test": test}


def _truncate(piece: Piece, nbytes: int) -> Piece:
    def load() -> str:
        raw = piece.load().encode("utf-8", "surrogatepass")[:nbytes]
        return raw.decode("utf-8", "ignore")  # drops a character cut in half

    return Piece(piece.name, nbytes, load)


def cap_pieces(pieces: list[Piece], budget: float) -> tuple[list[Piece], str | None]:
    """A sample of ``pieces`` holding at most ``budget`` bytes, and the name of the one cut short.

    Documents are kept whole, in order, while they fit in what is left of the budget; one larger
    than a quarter of the budget is passed over, so no single file dominates a small sample. What
    is left at the end is filled with the start of the first document passed over.
    """
    if budget == float("inf"):
        return list(pieces), None
    out: list[Piece] = []
    used = 0
    passed: Piece | None = None
    for p in pieces:
        if used + p.nbytes <= budget and p.nbytes <= budget / 4:
            out.append(p)
            used += p.nbytes
        elif passed is None:
            passed = p
    left = int(budget - used)
    if passed is None or left <= 0:
        return out, None
    if passed.nbytes <= left:
        return [*out, passed], None
    return [*out, _truncate(passed, left)], passed.name
