"""Real English text with no download: the docstrings of the running Python's standard library.

Every ``.py`` file of the standard library (:func:`sparseroute.data.sources.stdlib_files`: no
tests, idlelib or site-packages) is a module, named by its dotted path (``json.decoder``). Each
module goes wholly to one split, by a hash of its name (``sha256``): about ``heldout_share`` of
the modules are ``"heldout"``, the rest ``"calib"``, so no module gives text to both and where a
module goes never depends on the others. A module's docstrings are its own, its classes' and its
functions' (``ast.get_docstring``, indentation cleaned), in source order, each at least
``min_chars`` long, at most ``per_module`` of them (all when None).

A split's texts come in rounds, so that the first ones come from many modules: round r takes the
r-th docstring of every module of the split, the modules in the order of their name's hash (a
fixed shuffle). A text equal to one taken before is skipped. The same Python gives the same
texts in the same order.
"""

from __future__ import annotations

import ast
import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from sparseroute.data.sources import stdlib_files, stdlib_root

__all__ = ["SPLITS", "Docstring", "module_split", "iter_docstrings", "stdlib_docstrings"]

SPLITS = ("calib", "heldout")
HELDOUT_SHARE = 0.2


@dataclass(frozen=True)
class Docstring:
    """One docstring: ``module`` (dotted name), ``name`` (the qualified name of the class or
    function, ``""`` for the module's own) and ``text``."""

    module: str
    name: str
    text: str


def _module_name(rel: str) -> str:
    parts = rel.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "__init__"


def _rank(module: str) -> int:
    return int.from_bytes(hashlib.sha256(module.encode("utf-8")).digest()[:8], "big")


def module_split(module: str, heldout_share: float = HELDOUT_SHARE) -> str:
    """The split (``"calib"`` or ``"heldout"``) that a module's docstrings belong to."""
    return "heldout" if _rank(module) / 2**64 < heldout_share else "calib"


def _check(split: str, n: int | None, min_chars: int, per_module: int | None, heldout_share: float) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be an int >= 1 (or None for all); got {n!r}")
    for name, v in (("min_chars", min_chars), ("per_module", per_module)):
        if v is None and name == "per_module":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1; got {v!r}")
    if isinstance(heldout_share, bool) or not isinstance(heldout_share, (int, float)) or not 0 < heldout_share < 1:
        raise ValueError(f"heldout_share must be a number in (0, 1); got {heldout_share!r}")


def _docstrings_of(source: bytes, module: str) -> list[Docstring]:
    """The module's docstrings in source order (an unparsable file gives none)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    found: list[tuple[int, int, Docstring]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                qual = f"{prefix}{child.name}"
                text = ast.get_docstring(child, clean=True)
                if text:
                    found.append((child.lineno, child.col_offset, Docstring(module, qual, text.strip())))
                visit(child, qual + ".")
            elif not isinstance(child, (ast.expr, ast.Lambda)):
                visit(child, prefix)  # definitions inside if/try/with blocks

    text = ast.get_docstring(tree, clean=True)
    if text:
        found.append((0, 0, Docstring(module, "", text.strip())))
    visit(tree, "")
    return [d for _, _, d in sorted(found, key=lambda t: (t[0], t[1]))]


@lru_cache(maxsize=16)
def _split_modules(root: str, split: str, heldout_share: float) -> tuple[tuple[Docstring, ...], ...]:
    """Every docstring of every module of a split, one tuple per module, modules in hash order."""
    entries = [(_module_name(e.name), e) for e in stdlib_files(Path(root))]
    chosen = sorted(((_rank(mod), mod, e) for mod, e in entries if module_split(mod, heldout_share) == split),
                    key=lambda t: (t[0], t[1]))
    out = []
    for _, mod, entry in chosen:
        try:
            source = entry.path.read_bytes()
        except OSError:
            continue
        docs = tuple(_docstrings_of(source, mod))
        if docs:
            out.append(docs)
    return tuple(out)


def iter_docstrings(split: str = "calib", *, min_chars: int = 40, per_module: int | None = None,
                    heldout_share: float = HELDOUT_SHARE, root: str | Path | None = None) -> Iterator[Docstring]:
    """The docstrings of one split in round order (see the module docstring)."""
    _check(split, None, min_chars, per_module, heldout_share)
    base = stdlib_root() if root is None else Path(root)
    modules = [[d for d in docs if len(d.text) >= min_chars]
               for docs in _split_modules(str(base), split, float(heldout_share))]
    if per_module is not None:
        modules = [docs[:per_module] for docs in modules]
    seen: set[str] = set()
    for r in range(max((len(docs) for docs in modules), default=0)):
        for docs in modules:
            if r < len(docs) and docs[r].text not in seen:
                seen.add(docs[r].text)
                yield docs[r]


def stdlib_docstrings(split: str = "calib", n: int | None = None, *, min_chars: int = 40, per_module: int | None = None,
                      heldout_share: float = HELDOUT_SHARE, root: str | Path | None = None) -> list[str]:
    """The first ``n`` texts (all when None) of a split of the standard library's docstrings.
    Raises ValueError when the split holds fewer than ``n``."""
    _check(split, n, min_chars, per_module, heldout_share)
    out: list[str] = []
    for doc in iter_docstrings(split, min_chars=min_chars, per_module=per_module, heldout_share=heldout_share,
                               root=root):
        out.append(doc.text)
        if n is not None and len(out) >= n:
            break
    if n is not None and len(out) < n:
        cap = "" if per_module is None else f" (at most {per_module} per module)"
        raise ValueError(f"the {split} split of the standard library's docstrings holds {len(out)} texts of at least "
                         f"{min_chars} characters{cap}; asked for n={n}: ask for fewer, or lower min_chars")
    return out
