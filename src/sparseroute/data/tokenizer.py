"""Tokenizers: UTF-8 bytes (vocab 256) and byte-level BPE trained with Hugging Face ``tokenizers``.

Both round-trip exactly: ``decode(encode(s)) == s`` for any ``str`` (lone surrogates included for
bytes, which encodes them as their 3-byte form). ``decode`` never raises on ids that do not
form valid UTF-8 (as a model may sample); the broken bytes become U+FFFD.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Protocol, runtime_checkable

import numpy as np

__all__ = ["Tokenizer", "ByteTokenizer", "BPETokenizer", "train_bpe", "encode_stream"]


@runtime_checkable
class Tokenizer(Protocol):
    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


def _decode_utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return raw.decode("utf-8", "replace")


class ByteTokenizer:
    """Token id = one UTF-8 byte."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", "surrogatepass"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8)

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode_array(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < 256]
        if bad:
            raise ValueError(f"byte tokenizer ids must be in [0, 256); got {bad[:5]}")
        return _decode_utf8(bytes(ids))

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def _import_tokenizers():
    try:
        import tokenizers  # noqa: PLC0415  (optional; only the bpe tokenizer needs it)
    except ImportError as e:
        raise ValueError(
            "tokenizer='bpe' needs the `tokenizers` package (Hugging Face), which is not installed; "
            "install it with `pip install 'sparseroute[bpe]'` (or `pip install tokenizers`), or use tokenizer='bytes'"
        ) from e
    return tokenizers


class BPETokenizer:
    """Byte-level BPE from a ``tokenizer.json`` written by :func:`train_bpe`."""

    def __init__(self, path: str | Path):
        tk = _import_tokenizers()
        self.path = Path(path)
        self._tok = tk.Tokenizer.from_file(str(self.path))
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.name = f"bpe-{self.vocab_size}"

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        # encode_batch_fast (tokenizers >= 0.21) skips computing character offsets.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        encs = encode(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"bpe token ids must be in [0, {self.vocab_size}); got {bad[:5]}")
        return self._tok.decode(ids, skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"BPETokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: Path, *, progress: bool = False) -> None:
    """Train a byte-level BPE (all 256 bytes in the base alphabet, no special tokens) and save it."""
    tk = _import_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: PLC0415

    tok = tk.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(out_path))


def _chunks(text: str, size: int = 1 << 20) -> Iterator[str]:
    """Cut a long text after a newline near every ``size`` characters (for parallel encoding)."""
    start = 0
    while len(text) - start > size:
        cut = text.rfind("\n", start + size // 2, start + size)
        cut = start + size if cut < 0 else cut + 1
        yield text[start:cut]
        start = cut
    if start < len(text) or not text:
        yield text[start:]


def encode_stream(tokenizer: ByteTokenizer | BPETokenizer, texts: Iterable[str], separator: str,
                  batch_chars: int = 8 << 20) -> Iterator[np.ndarray]:
    """Token ids of ``separator.join(texts)``, encoded document by document, yielded in pieces.

    Documents are encoded separately (and long ones in newline-aligned chunks), so a BPE merge never
    spans two documents; with bytes the result equals encoding the joined text.
    """
    sep = np.asarray(tokenizer.encode(separator), dtype=np.int64)
    batch: list[str] = []
    bounds: list[bool] = []  # whether the separator goes before this chunk
    chars = 0
    first = True

    def flush() -> Iterator[np.ndarray]:
        for arr, sep_before in zip(tokenizer.encode_many(batch), bounds):
            if sep_before:
                yield sep
            yield arr

    for text in texts:
        for j, chunk in enumerate(_chunks(text)):
            batch.append(chunk)
            bounds.append(j == 0 and not first)
            chars += len(chunk)
            if chars >= batch_chars:
                yield from flush()
                batch, bounds, chars = [], [], 0
        first = False
    if batch:
        yield from flush()
