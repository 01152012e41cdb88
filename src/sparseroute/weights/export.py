"""Export of pruned weights: packed N:M storage on disk, and torch's 2:4 semi-structured tensors on GPU.

**Packed file** (:func:`save_packed` / :func:`load_packed`): one safetensors file. Every weight
of an N:M layer is stored as

- ``<weight>.nm_values``: the kept values, ``[O, I·n/m]`` in the weight's dtype, group by group in
  input order (a group that keeps fewer than n is padded with zeros at its end);
- ``<weight>.nm_meta``: which positions of each group of m are kept, bit-packed into ``uint8``
  row by row (least significant bit first), in whichever code is smaller for this n:m:
  ``index`` (each kept position's index inside its group, ``ceil(log2 m)`` bits, n per group) or
  ``bitmask`` (m presence bits per group; also used when a group keeps fewer than n).

The layer's ``mask`` is not stored: it is what the codes say. Every other tensor (biases,
embeddings, norms, masks of layers that are not N:M) is stored as it is. The safetensors metadata
holds ``format`` (``sparseroute.packed``), ``version``, ``packed`` (JSON: per packed weight its
shape, n, m, dtype, code and mask key), ``order`` (the state dict's key order) and
``content_sha256`` (a digest of every tensor, so that a damaged file is refused, never loaded
as wrong weights).

:func:`load_packed` gives back the state dict: each packed weight is ``weight ⊙ mask``
bit-exactly (the kept values with their exact bits, masked positions exactly ``+0``, the same
dtype), with its mask. A weight's values under its mask are not kept: the file stores what the
layer computes with.

2:4 on a 2:4-sized weight in fp16 costs 1 byte of values and 1/8 byte of codes per weight: 0.5625
of the dense bytes.

**GPU** (:func:`to_semi_structured`): 2:4 fp16/bf16 SparseLinears become linears whose weight is a
``torch.sparse.to_sparse_semi_structured`` tensor (CUDA, compute capability 8.0+, 2-D).

Legend: O output features, I input features, G groups of m per row, L code bits per row.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from sparseroute.fileio import atomic_path
from sparseroute.weights.linear import SparseLinear, _set_child, sparse_layers
from sparseroute.weights.patterns import Pattern, parse_pattern, pattern_violations

__all__ = [
    "FORMAT",
    "VERSION",
    "PackedFileError",
    "PackStats",
    "save_packed",
    "load_packed",
    "load_packed_into",
    "pack_weight",
    "unpack_weight",
    "packed_code",
    "to_semi_structured",
]

FORMAT = "sparseroute.packed"
VERSION = 1
VALUES, META = ".nm_values", ".nm_meta"
_RESERVED = ("format", "version", "packed", "order", "content_sha256")


class PackedFileError(ValueError):
    """A packed file is unreadable, damaged, not written by :func:`save_packed`, or does not fit
    the model it is loaded into."""


@dataclass(frozen=True, kw_only=True)
class PackStats:
    """What :func:`save_packed` wrote.

    file_bytes: the file's size. packed_layers: how many weights were packed N:M.
    packed_bytes: the bytes of their values and codes; dense_bytes: the bytes the same weights
    take dense (their masks not counted); ratio = packed_bytes / dense_bytes (0 when nothing
    was packed)."""

    path: str
    file_bytes: int
    packed_layers: int
    packed_bytes: int
    dense_bytes: int

    @property
    def ratio(self) -> float:
        return self.packed_bytes / self.dense_bytes if self.dense_bytes else 0.0

    def to_dict(self) -> dict:
        return {"path": self.path, "file_bytes": self.file_bytes, "packed_layers": self.packed_layers,
                "packed_bytes": self.packed_bytes, "dense_bytes": self.dense_bytes, "ratio": round(self.ratio, 6)}


# ---------------------------------------------------------------------------------------------
# codes


def _index_bits(m: int) -> int:
    return max(1, (m - 1).bit_length())


def packed_code(n: int, m: int) -> str:
    """The code :func:`pack_weight` uses for n:m when every group keeps exactly n: ``index``
    (n·ceil(log2 m) bits a group) when that is fewer bits than ``bitmask`` (m bits), else
    ``bitmask``."""
    return "index" if n * _index_bits(m) < m else "bitmask"


def _pack_bits(bits_OL: Tensor) -> Tensor:
    """[O, L] of 0/1 → [O, ceil(L/8)] uint8, least significant bit first."""
    O, L = bits_OL.shape
    pad = (-L) % 8
    if pad:
        bits_OL = torch.cat([bits_OL, bits_OL.new_zeros(O, pad)], dim=1)
    shifts = torch.arange(8, dtype=torch.uint8, device=bits_OL.device)
    return (bits_OL.to(torch.uint8).view(O, -1, 8) << shifts).sum(-1).to(torch.uint8)


def _unpack_bits(bytes_OB: Tensor, L: int) -> Tensor:
    """Inverse of :func:`_pack_bits`: [O, B] uint8 → [O, L] uint8 of 0/1."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bytes_OB.device)
    return ((bytes_OB.unsqueeze(-1) >> shifts) & 1).reshape(bytes_OB.shape[0], -1)[:, :L]


def _slot_order(mask_OGm: Tensor, n: int) -> Tensor:
    """For each group, the kept positions in input order, then the unkept ones: the first n [O, G, n]."""
    m = mask_OGm.shape[-1]
    key = (~mask_OGm).to(torch.int64) * m + torch.arange(m, device=mask_OGm.device)
    return torch.argsort(key, dim=-1)[..., :n]


def _code_bits(n: int, m: int, code: str) -> int:
    return n * _index_bits(m) if code == "index" else m


@torch.no_grad()
def pack_weight(weight_OI: Tensor, mask_OI: Tensor, n: int, m: int, name: str = "weight") -> tuple[Tensor, Tensor, str]:
    """(values [O, I·n/m], codes [O, B] uint8, code name) of ``weight ⊙ mask`` for an n:m mask
    (at most n kept in every group of m). See the module docstring for the codes."""
    O, I = weight_OI.shape
    if tuple(mask_OI.shape) != (O, I):
        raise ValueError(f"{name}: mask shape {tuple(mask_OI.shape)} differs from the weight's {(O, I)}")
    bad = pattern_violations(mask_OI.bool(), Pattern(kind="nm", n=n, m=m))
    if bad:
        raise ValueError(f"{name}: cannot pack as {n}:{m}: " + "; ".join(bad))
    G = I // m
    mask_OGm = mask_OI.bool().reshape(O, G, m)
    full = bool((mask_OGm.sum(-1) == n).all())
    code = packed_code(n, m) if full else "bitmask"
    slots_OGn = _slot_order(mask_OGm, n)
    kept_OGm = torch.where(mask_OGm, weight_OI.reshape(O, G, m), torch.zeros((), dtype=weight_OI.dtype,
                                                                              device=weight_OI.device))
    values = torch.gather(kept_OGm, -1, slots_OGn).reshape(O, G * n).contiguous()
    if code == "index":
        b = _index_bits(m)
        shifts = torch.arange(b, device=weight_OI.device)
        bits = ((slots_OGn.reshape(O, G * n, 1) >> shifts) & 1).reshape(O, G * n * b)
    else:
        bits = mask_OGm.reshape(O, I)
    return values, _pack_bits(bits), code


@torch.no_grad()
def unpack_weight(values: Tensor, codes: Tensor, shape: tuple[int, int], n: int, m: int, code: str,
                  name: str = "weight") -> tuple[Tensor, Tensor]:
    """(weight [O, I], mask [O, I] bool) from :func:`pack_weight`'s values and codes; raises
    :class:`PackedFileError` when they do not decode to an n:m mask of this shape."""
    O, I = shape
    G = I // m
    L = G * _code_bits(n, m, code)
    if tuple(values.shape) != (O, G * n):
        raise PackedFileError(f"{name}: values have shape {tuple(values.shape)}; a {n}:{m} weight of shape "
                              f"{(O, I)} needs {(O, G * n)}")
    if codes.dtype != torch.uint8 or tuple(codes.shape) != (O, math.ceil(G * _code_bits(n, m, code) / 8)):
        raise PackedFileError(f"{name}: codes are {codes.dtype} {tuple(codes.shape)}; expected uint8 "
                              f"{(O, math.ceil(G * _code_bits(n, m, code) / 8))}")
    bits = _unpack_bits(codes, L)
    if code == "index":
        b = _index_bits(m)
        weights = 1 << torch.arange(b, device=codes.device)
        slots_OGn = (bits.reshape(O, G, n, b).to(torch.int64) * weights).sum(-1)
        if bool((slots_OGn >= m).any()):
            raise PackedFileError(f"{name}: an index code points outside its group of {m}")
        mask_OGm = torch.zeros(O, G, m, dtype=torch.bool, device=codes.device).scatter_(-1, slots_OGn, True)
        if bool((mask_OGm.sum(-1) != n).any()):
            raise PackedFileError(f"{name}: an index code names the same position twice in a group")
    elif code == "bitmask":
        mask_OGm = bits.reshape(O, G, m).bool()
        if bool((mask_OGm.sum(-1) > n).any()):
            raise PackedFileError(f"{name}: a group's bitmask keeps more than {n} of {m}")
        slots_OGn = _slot_order(mask_OGm, n)
    else:
        raise PackedFileError(f"{name}: unknown code {code!r} (index or bitmask)")
    weight_OGm = torch.zeros(O, G, m, dtype=values.dtype, device=values.device)
    weight_OGm.scatter_(-1, slots_OGn.to(values.device), values.reshape(O, G, n))
    return weight_OGm.reshape(O, I), mask_OGm.reshape(O, I)


# ---------------------------------------------------------------------------------------------
# files


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _digest(tensors: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"{key}\0{_dtype_name(t.dtype)}\0{list(t.shape)}\n".encode())
        if t.numel():
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _nm(p: Pattern | str | None) -> Pattern | None:
    if p is None:
        return None
    p = parse_pattern(p)
    return p if p.kind == "nm" else None


def _patterns_of(obj, patterns) -> tuple[dict[str, Tensor], dict[str, Pattern]]:
    """The state dict to write and the N:M pattern of each module whose weight is packed."""
    if isinstance(obj, nn.Module):
        sd = obj.state_dict()
        chosen = {}
        for name, mod in sparse_layers(obj):
            p = _nm(mod.pattern)
            if p is not None and (mod.mask.ndim == 2):
                chosen[name] = p
        if patterns is not None:
            raise ValueError("patterns: a model's N:M layers carry their own patterns; pass patterns only with a "
                             "state dict")
        return dict(sd), chosen
    if not isinstance(obj, Mapping):
        raise ValueError(f"save_packed takes an nn.Module or a state dict; got {type(obj).__name__}")
    sd = dict(obj)
    modules = [k[: -len(".mask")] for k in sd if k.endswith(".mask") and k[: -len(".mask")] + ".weight" in sd]
    if patterns is None:
        return sd, {}
    if isinstance(patterns, Mapping):
        chosen = {}
        for name, p in patterns.items():
            if name not in modules:
                raise ValueError(f"patterns: {name!r} has no {name}.weight with a {name}.mask in the state dict")
            if _nm(p) is None:
                raise ValueError(f"patterns[{name!r}]: packing needs an N:M pattern like 2:4; got {p!r}")
            chosen[name] = _nm(p)
        return sd, chosen
    p = _nm(patterns)
    if p is None:
        raise ValueError(f"patterns: packing needs an N:M pattern like 2:4; got {patterns!r}")
    return sd, {name: p for name in modules}


def save_packed(model_or_state_dict, path: str | Path, *, patterns=None,
                metadata: Mapping[str, str] | None = None) -> PackStats:
    """Write a model's (or a state dict's) tensors to ``path`` with every N:M weight packed (see
    the module docstring), atomically (a temporary file renamed onto ``path``).

    A model: each SparseLinear whose pattern is N:M is packed. A state dict: ``patterns`` names
    them, either one pattern (``"2:4"``) for every ``X.weight`` that has an ``X.mask``, or a dict
    ``{module name: pattern}``; without it nothing is packed. A mask that breaks its pattern
    raises ValueError naming the layer. ``metadata``: more string entries for the file's header."""
    sd, chosen = _patterns_of(model_or_state_dict, patterns)
    extra = dict(metadata or {})
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ValueError(f"metadata: the keys {', '.join(clash)} are reserved; allowed: any other string keys")
    if any(not isinstance(k, str) or not isinstance(v, str) for k, v in extra.items()):
        raise ValueError("metadata: keys and values must be strings")
    out: dict[str, Tensor] = {}
    packed: dict[str, dict] = {}
    packed_bytes = dense_bytes = 0
    skip = set()
    for name, p in chosen.items():
        wkey, mkey = f"{name}.weight", f"{name}.mask"
        w, mask = sd[wkey], sd[mkey]
        if w.ndim != 2:
            raise ValueError(f"{wkey}: packing needs a 2-D weight; got shape {tuple(w.shape)}")
        p.check_shape(tuple(w.shape), wkey)
        values, codes, code = pack_weight(w.detach().cpu(), mask.detach().cpu(), p.n, p.m, wkey)
        out[wkey + VALUES], out[wkey + META] = values, codes
        packed[wkey] = {"shape": list(w.shape), "n": p.n, "m": p.m, "dtype": _dtype_name(w.dtype), "code": code,
                        "mask": mkey}
        packed_bytes += values.numel() * values.element_size() + codes.numel()
        dense_bytes += w.numel() * w.element_size()
        skip.update((wkey, mkey))
    seen: set[int] = set()
    for key, t in sd.items():
        if key in skip:
            continue
        if not isinstance(t, Tensor):
            raise ValueError(f"{key}: a state dict holds tensors; got {type(t).__name__}")
        t = t.detach().cpu().contiguous()
        storage = t.untyped_storage().data_ptr() if t.numel() else None
        if storage is not None and storage in seen:  # tied weights or views of one buffer: a copy each
            t = t.clone()
        elif storage is not None:
            seen.add(storage)
        out[key] = t
    header = {"format": FORMAT, "version": str(VERSION), "packed": json.dumps(packed, sort_keys=True),
              "order": json.dumps(list(sd)), "content_sha256": _digest(out), **extra}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(out, str(tmp), metadata=header)
    return PackStats(path=str(path), file_bytes=path.stat().st_size, packed_layers=len(packed),
                     packed_bytes=packed_bytes, dense_bytes=dense_bytes)


def read_packed_metadata(path: str | Path) -> dict[str, str]:
    """The header metadata of a packed file (raises :class:`PackedFileError` for a file that is
    not one)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except FileNotFoundError:
        raise PackedFileError(f"{path} does not exist") from None
    except Exception as e:  # safetensors' own error type for a damaged header
        raise PackedFileError(f"{path} is not a readable safetensors file ({e}); it may be truncated") from None
    if meta.get("format") != FORMAT:
        raise PackedFileError(f"{path} is not a packed sparseroute file (its metadata has no format={FORMAT}); "
                              "write it with sparseroute.weights.export.save_packed")
    if meta.get("version") != str(VERSION):
        raise PackedFileError(f"{path} has packed-format version {meta.get('version')!r}; this version reads {VERSION}")
    return meta


def load_packed(path: str | Path, *, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """The state dict written by :func:`save_packed`: packed weights restored dense (``weight ⊙
    mask``, bit-exact, the same dtype) with their masks, every other tensor as it was, in the
    original key order. A damaged, edited or foreign file raises :class:`PackedFileError`."""
    path = Path(path)
    meta = read_packed_metadata(path)
    try:
        packed = json.loads(meta["packed"])
        order = json.loads(meta["order"])
        digest = meta["content_sha256"]
    except (KeyError, json.JSONDecodeError) as e:
        raise PackedFileError(f"{path}: its packed-format metadata is damaged ({e})") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise PackedFileError(f"{path}: cannot read its tensors ({e}); the file may be truncated") from None
    if _digest(stored) != digest:
        raise PackedFileError(f"{path} is corrupt: its tensors do not match the checksum recorded when it was written")
    sd: dict[str, Tensor] = {}
    for wkey, info in packed.items():
        try:
            shape, n, m, code, mkey = tuple(info["shape"]), int(info["n"]), int(info["m"]), info["code"], info["mask"]
            dtype = getattr(torch, info["dtype"])
            values, codes = stored.pop(wkey + VALUES), stored.pop(wkey + META)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PackedFileError(f"{path}: the entry of {wkey} is incomplete ({e!r} missing or wrong)") from None
        if values.dtype != dtype:
            raise PackedFileError(f"{path}: {wkey}'s values are {values.dtype}; the metadata says {dtype}")
        w, mask = unpack_weight(values, codes, shape, n, m, code, f"{path}: {wkey}")
        sd[wkey], sd[mkey] = w, mask
    sd.update(stored)
    missing = [k for k in order if k not in sd]
    if missing or len(order) != len(sd):
        raise PackedFileError(f"{path}: the tensors do not match its key list (missing: {missing[:5]})")
    return {k: sd[k].to(device) for k in order}


def load_packed_into(model: nn.Module, path: str | Path, *, strict: bool = True) -> list[str]:
    """Load a packed file into ``model``: each module that the file gives a mask but that is a
    plain ``nn.Linear`` in the model becomes a SparseLinear first (with the file's N:M pattern
    when it has one); then the state dict is loaded. Returns the names of the swapped modules.
    A file that does not fit the model raises :class:`PackedFileError` naming what differs."""
    sd = load_packed(path)
    packed = json.loads(read_packed_metadata(path)["packed"])
    patterns = {info["mask"][: -len(".mask")]: f"{info['n']}:{info['m']}" for info in packed.values()}
    swapped = []
    for key, mask in sd.items():
        if not key.endswith(".mask"):
            continue
        name = key[: -len(".mask")]
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise PackedFileError(f"{path} does not fit this model: it has no module {name}") from None
        if isinstance(mod, SparseLinear):
            continue
        if not isinstance(mod, nn.Linear):
            raise PackedFileError(f"{path} does not fit this model: {name} is a {type(mod).__name__}, not a linear")
        if tuple(mod.weight.shape) != tuple(mask.shape):
            raise PackedFileError(f"{path} does not fit this model: {name} has shape {tuple(mod.weight.shape)}, "
                                  f"the file {tuple(mask.shape)}")
        _set_child(model, name, SparseLinear.from_linear(mod, mask=mask, pattern=patterns.get(name), name=name))
        swapped.append(name)
    try:
        model.load_state_dict(sd, strict=strict)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise PackedFileError(f"{path} does not fit this model: {' '.join(s.strip() for s in first[:4])}") from None
    return swapped


# ---------------------------------------------------------------------------------------------
# GPU 2:4


SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


def _semi_structured_problem(mod: SparseLinear) -> str | None:
    w = mod.weight
    if not torch.cuda.is_available() or w.device.type != "cuda":
        return f"its weight is on {w.device}; move the model to a CUDA device"
    major, minor = torch.cuda.get_device_capability(w.device)
    if major < 8:
        return f"the device has compute capability {major}.{minor}; 2:4 kernels need 8.0 or newer"
    if w.dtype not in SEMI_STRUCTURED_DTYPES:
        return f"its weight is {_dtype_name(w.dtype)}; convert the model to float16 or bfloat16 first"
    if w.ndim != 2:
        return f"its weight has {w.ndim} dimensions, not 2"
    if pattern_violations(mod.mask, "2:4"):
        return "its mask is not 2:4"
    return None


def to_semi_structured(model: nn.Module) -> list[str]:
    """Replace each 2:4 SparseLinear by a linear whose weight is
    ``torch.sparse.to_sparse_semi_structured(weight ⊙ mask)`` (inference only: the weight does not
    train). Needs CUDA with compute capability 8.0+ (Ampere or newer), fp16/bf16 weights, 2-D 2:4
    masks, and shapes the kernels take (rows and columns multiples of 32/64). Every layer is checked
    before any changes; a layer that does not qualify raises ValueError naming it and the
    requirement it misses. Returns the converted names."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    layers = sparse_layers(model)
    if not layers:
        raise ValueError("to_semi_structured: the model has no SparseLinear layer; prune or sparsify it first")
    for name, mod in layers:
        problem = _semi_structured_problem(mod)
        if problem is not None:
            raise ValueError(f"to_semi_structured needs CUDA (compute capability 8.0+), float16/bfloat16 weights "
                             f"and 2-D 2:4 masks: layer {name}: {problem}")
    replacements = []  # every layer converted before any is swapped: a failure changes nothing
    for name, mod in layers:
        dense = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device=mod.weight.device,
                          dtype=mod.weight.dtype)
        with torch.no_grad():
            w = torch.where(mod.mask, mod.weight, torch.zeros((), dtype=mod.weight.dtype, device=mod.weight.device))
            forced = SparseSemiStructuredTensor._FORCE_CUTLASS
            if not torch.backends.cusparselt.is_available():  # torch's default kernel is cuSPARSELt's
                SparseSemiStructuredTensor._FORCE_CUTLASS = True
            try:
                sparse = to_sparse_semi_structured(w.contiguous())
            except RuntimeError as e:
                raise ValueError(f"to_semi_structured: layer {name} (shape {tuple(w.shape)}): {e}") from None
            finally:
                SparseSemiStructuredTensor._FORCE_CUTLASS = forced
            dense.weight = nn.Parameter(sparse, requires_grad=False)
            if mod.bias is not None:
                dense.bias = nn.Parameter(mod.bias.detach().clone(), requires_grad=False)
        replacements.append((name, dense))
    for name, dense in replacements:
        _set_child(model, name, dense)
    done = [name for name, _ in replacements]
    return done
