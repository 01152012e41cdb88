"""Training configuration: the run = model + data + optimisation, each a frozen dataclass, and the
one way a run is written down by hand: a nested dict (or TOML file) of settings,

    {"model": {"preset": "tiny", "moe": {"router": "cosine"}}, "data": {...}, "train": {"tokens": "2M"}}

(``model.attention = {"router": "moba", "router_options": {"top_k": 4}}`` makes the attention
block-sparse, ``[model.attention]`` in TOML, ``model.attention=false`` dense again)

changed by dotted ``SECTION.FIELD=VALUE`` settings (:func:`apply_setting`) and resolved into a
validated :class:`RunConfig` by :func:`resolve_run`. ``sparseroute train`` (``--config``, ``--set``
and the flags, which are shorthands for settings) and the lab's sweep specs (a base plus each
variant's changes, :func:`merge_settings`) both go through it.
"""

from __future__ import annotations

import copy
import json
import math
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from sparseroute.data import DataConfig
from sparseroute.models import LMConfig, preset, sized
from sparseroute.weights.training import SparseTrainingConfig

_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}


def parse_count(text: str | int, what: str = "tokens") -> int:
    """Parse counts like ``300k``, ``2M``, ``1.5m``, ``4096`` into an int (> 0)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGbB]?)\s*", str(text))
        if not m:
            raise ValueError(f"{what}: expected a number like 300k, 2M or 4096; got {text!r}")
        value = int(round(float(m.group(1)) * _SUFFIX[m.group(2).lower()]))
    if value <= 0:
        raise ValueError(f"{what} must be > 0; got {text!r}")
    return value


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation and bookkeeping.

    tokens: training budget (tokens seen = steps · batch_size · seq_len, steps rounded down).
    lr / min_lr_ratio / warmup_fraction: AdamW peak rate, linear warmup over that fraction of the
        steps, cosine decay to lr · min_lr_ratio.
    grad_clip: clip the global gradient norm (0 = off).
    eval_tokens: tokens of validation/test text used for each perplexity evaluation.
    eval_every / log_every / checkpoint_every: in steps (0 = only at the end).
    halting_taus: for multi-hop MoE models, relative-norm halting thresholds evaluated (zero-shot,
        on the validation text) at the end of training; the curve goes into the final metrics.
    halting_quantiles: more thresholds, taken at these quantiles (in (0, 1)) of the trained
        model's own hop-0 relative update norms (τ at q halts about a share q of the tokens).
    sparsity: None (dense weights) or the weight sparsity trained from scratch in the model's
        linears (not the output head): an N:M pattern such as ``"2:4"`` for the sparse methods
        ste / sr-ste / progressive, or a share such as ``"0.9"`` for rigl / set.
    sparse_method: how the sparse weights are trained (``sparseroute.weights.SPARSE_METHODS``:
        sr-ste, ste, progressive, rigl, set). sparse_options: that method's hyperparameters (see
        ``sparseroute.weights.training.SparseTrainingConfig``: lam; kind, decay_fraction;
        update_every, alpha, end_fraction, densities; filter). Both need ``sparsity``; a dense run
        leaves all three out of its stored config.
    """

    tokens: int = 2_000_000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    eval_tokens: int = 65_536
    eval_every: int = 0
    log_every: int = 10
    checkpoint_every: int = 50
    device: str = "cpu"
    halting_taus: tuple[float, ...] = ()
    halting_quantiles: tuple[float, ...] = ()
    sparsity: str | None = None
    sparse_method: str = "sr-ste"
    sparse_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("lr", "min_lr_ratio", "warmup_fraction", "weight_decay", "beta1", "beta2", "grad_clip"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{name} must be a number; got {v!r}")
        if not isinstance(self.device, str):
            raise ValueError(f"device must be cpu, cuda or cuda:N; got {self.device!r}")
        for name, ok, allowed in (("halting_quantiles", lambda v: 0 < v < 1, "in (0, 1)"),
                                  ("halting_taus", lambda v: 0 <= v < math.inf, ">= 0")):
            given = getattr(self, name)
            values = tuple(given) if isinstance(given, list) else given
            object.__setattr__(self, name, values)
            if not isinstance(values, tuple) or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v) for v in values
            ):
                raise ValueError(f"{name} must be a list of numbers {allowed}; got {given!r}")
        for name in ("tokens", "batch_size", "seq_len", "eval_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int; got {v!r}")
        for name in ("eval_every", "log_every", "checkpoint_every", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be an int >= 0; got {v!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0; got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1]; got {self.min_lr_ratio!r}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1); got {self.warmup_fraction!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0; got {self.weight_decay!r}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1); got {getattr(self, name)!r}")
        if not self.grad_clip >= 0:
            raise ValueError(f"grad_clip must be >= 0 (0 = off); got {self.grad_clip!r}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu, cuda or cuda:N; got {self.device!r}")
        if self.tokens < self.batch_size * self.seq_len:
            raise ValueError(
                f"tokens={self.tokens} is less than one batch ({self.batch_size}×{self.seq_len}); raise tokens"
            )
        self._check_sparse()

    def _check_sparse(self) -> None:
        if not isinstance(self.sparse_options, dict):
            raise ValueError(f"sparse_options must be a table of option name -> value; got {self.sparse_options!r}")
        object.__setattr__(self, "sparse_options", dict(self.sparse_options))
        if self.sparsity is None:
            given = [f"{name}={getattr(self, name)!r}" for name in ("sparse_method", "sparse_options")
                     if getattr(self, name) != _SPARSE_DEFAULTS[name]]
            if given:
                raise ValueError(f"{', '.join(given)} needs sparsity (e.g. sparsity=2:4, or 0.9 for rigl/set); "
                                 "a dense run leaves them out")
            return
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (str, int, float)):
            raise ValueError(f"sparsity must be an N:M pattern like 2:4 or a share like 0.9; got {self.sparsity!r}")
        sparse = self.sparse_training()
        object.__setattr__(self, "sparsity", sparse.sparsity)  # the canonical spelling

    def sparse_training(self) -> SparseTrainingConfig | None:
        """The validated sparse training of the run (None for dense weights)."""
        if self.sparsity is None:
            return None
        return SparseTrainingConfig.from_settings(self.sparsity, self.sparse_method, self.sparse_options)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields; a dense run (``sparsity`` None) leaves the sparse fields out, so
        its stored config is what it was before sparse training existed."""
        d = asdict(self)
        if self.sparsity is None:
            for name in _SPARSE_DEFAULTS:
                del d[name]
        return d

    @property
    def steps(self) -> int:
        return self.tokens // (self.batch_size * self.seq_len)

    def lr_factor(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based) as a multiple of ``lr``: a linear
        warmup, then a cosine decay to ``min_lr_ratio``."""
        n = self.steps
        warm = max(1, int(round(self.warmup_fraction * n))) if self.warmup_fraction > 0 else 0
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, n - warm)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (what the training loop's scheduler sets)."""
        return self.lr * self.lr_factor(step)


_SPARSE_DEFAULTS = {"sparsity": None, "sparse_method": "sr-ste", "sparse_options": {}}


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    model: LMConfig
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.train.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"seq_len={self.train.seq_len} exceeds the model's max_seq_len={self.model.max_seq_len}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "data": asdict(self.data), "train": self.train.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        unknown = set(d) - {"model", "data", "train"}
        if unknown:
            raise ValueError(f"unknown run config section(s): {', '.join(sorted(unknown))}")
        builders = (("model", LMConfig.from_dict), ("data", lambda x: _build(DataConfig, x)),
                    ("train", lambda x: _build(TrainConfig, x)))
        parts = {}
        for section, build in builders:
            try:
                parts[section] = build(d["model"] if section == "model" else d.get(section, {}))
            except (ValueError, TypeError) as e:  # a field of the wrong type: name the section
                raise ValueError(f"{section}: {e}") from None
        return cls(**parts)


def _build(cls, d: dict[str, Any]):
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
    return cls(**d)


# -- settings: the hand-written form of a run ------------------------------------------------------

SECTIONS = ("model", "data", "train")
#: settings whose values may be written as counts (300k, 2M)
COUNT_FIELDS = (("train", "tokens"), ("train", "eval_tokens"), ("data", "max_bytes"))
#: model settings that pick the starting point; each replaces the other
_MODEL_BASES = ("preset", "depth")


def parse_value(text: str) -> Any:
    """A setting's value from the command line: JSON when it parses (numbers, true/false, null,
    lists, tables), else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text.strip()


def apply_setting(settings: dict[str, Any], setting: str) -> None:
    """Apply ``SECTION.FIELD[.SUB]=VALUE`` to ``settings`` in place (VALUE parsed by
    :func:`parse_value`), e.g. ``train.tokens=300k``, ``model.moe.router=cosine``,
    ``model.moe.router_options.d_space=32``, ``model.moe=false`` (a dense model),
    ``model.attention.router=moba``, ``model.attention.router_options.top_k=4``,
    ``model.attention.router_options={"top_k": 4, "key_conv": 4}`` (JSON), ``model.attention=false``
    (dense attention). Setting
    ``model.preset`` drops ``model.depth`` and the other way round."""
    key, sep, raw = setting.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ValueError(
            f"--set takes SECTION.FIELD=VALUE, e.g. train.tokens=300k or model.moe.top_k=1; got {setting!r}"
        )
    if not raw.strip():
        raise ValueError(f"--set {key.strip()}= has no value; write {key.strip()}=VALUE ('\"\"' for an empty text)")
    set_path(settings, parts, parse_value(raw), what=f"--set {key.strip()}")


def set_path(settings: dict[str, Any], parts: list[str], value: Any, *, what: str = "setting") -> None:
    """``settings[parts[0]][parts[1]]... = value``, creating tables on the way (a non-table value
    on the way, such as ``model.moe = false``, is replaced by a table)."""
    if parts[0] not in SECTIONS:
        raise ValueError(f"{what}: the section must be one of {', '.join(SECTIONS)}; got {parts[0]!r}")
    node = settings
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            node[p] = nxt
        node = nxt
    node[parts[-1]] = value
    if len(parts) == 2 and parts[0] == "model" and parts[1] in _MODEL_BASES:
        node.pop(_MODEL_BASES[1 - _MODEL_BASES.index(parts[1])], None)


def read_toml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A TOML file's tables; a missing file or bad TOML raises ValueError naming the file."""
    p = Path(path)
    try:
        return tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ValueError(f"{what} {p} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{p}: not valid TOML ({e})") from None


def load_settings(path: str | Path) -> dict[str, Any]:
    """Read a run's settings from a TOML file with [model], [data] and [train] tables."""
    p = Path(path)
    data = read_toml(p)
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{p}: unknown table(s) {', '.join(unknown)}; a run config has {', '.join(SECTIONS)}")
    return data


def merge_settings(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` merged in: tables merge key by key, anything else replaces. A
    ``model.moe`` table merges into the base's MoE settings (or the defaults when the base is
    dense); ``model.moe = false`` makes the model dense. ``model.attention`` likewise (a table of
    AttentionConfig settings, or false for dense attention)."""
    model = changes.get("model") if isinstance(changes.get("model"), dict) else {}
    for key, what in (("moe", "MoE settings or false (dense)"),
                      ("attention", "sparse attention settings or false (dense attention)")):
        value = model.get(key, ...)
        if value is not ... and value not in (False, None) and not isinstance(value, dict):
            raise ValueError(f"model.{key} must be a table of {what}; got {value!r}")
    return _merge(base, changes)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def resolve_run(settings: dict[str, Any]) -> RunConfig:
    """The validated :class:`RunConfig` of a settings dict: ``model`` starts from ``preset`` (a
    name of ``sparseroute.models.PRESETS``, default tiny) or ``depth`` (the one-dial family) and
    its other keys override that model's fields; counts may be written as 300k / 2M; a sequence
    length beyond the model's ``max_seq_len`` raises it. Errors name the field."""
    if not isinstance(settings, dict):
        raise ValueError(f"run settings must be a table with {', '.join(SECTIONS)}; got {settings!r}")
    unknown = sorted(set(settings) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown section(s) {', '.join(unknown)}; allowed: {', '.join(SECTIONS)}")
    for section in SECTIONS:
        if not isinstance(settings.get(section, {}), dict):
            raise ValueError(f"{section} must be a table of settings; got {settings[section]!r}")
    model = dict(settings.get("model", {}))
    name, depth = model.pop("preset", None), model.pop("depth", None)
    if name is not None and depth is not None:
        raise ValueError("model: give a preset or a depth, not both")
    start = sized(depth) if depth is not None else preset(name or "tiny")
    model = _merge(start.to_dict(), model)
    for key in ("moe", "attention"):
        if model.get(key) is False:
            model[key] = None
    data = copy.deepcopy(settings.get("data", {}))
    train = copy.deepcopy(settings.get("train", {}))
    for section, key in COUNT_FIELDS:
        d = train if section == "train" else data
        if d.get(key) is not None:
            d[key] = parse_count(d[key], f"{section}.{key}")
    seq_len = train.get("seq_len", TrainConfig.seq_len)
    if isinstance(seq_len, int) and not isinstance(seq_len, bool) and seq_len > model.get("max_seq_len", 0):
        model["max_seq_len"] = seq_len
    return RunConfig.from_dict({"model": model, "data": data, "train": train})


def config_diff(given: dict, stored: dict, prefix: str = "", only: Callable[[str], bool] | None = None) -> str:
    """``field: X stored, Y given`` for every leaf where two config dicts differ (``only``: which
    dotted paths to report)."""
    parts = []
    for k in sorted(set(given) | set(stored)):
        va, vb = given.get(k), stored.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            sub = config_diff(va, vb, f"{prefix}{k}.", only)
            if sub:
                parts.append(sub)
        elif va != vb and (only is None or only(f"{prefix}{k}")):
            parts.append(f"{prefix}{k}: {vb!r} stored, {va!r} given")
    return "; ".join(parts)


def _leaf_paths(settings: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in settings.items():
        if isinstance(v, dict) and v:
            out += _leaf_paths(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


#: model fields a preset or depth does not decide: fitted to the tokenizer, raised by seq_len, or
#: the MoE and sparse attention settings (given by their own keys)
_NOT_FROM_BASE = ("vocab_size", "max_seq_len", "moe", "attention")


def settings_conflicts(stored: RunConfig, settings: dict[str, Any]) -> str:
    """How ``settings`` (what a command gave) disagree with a stored run, listing only the fields
    they set (a field they leave out takes the stored value, not a default); empty when they
    agree. ``model.preset`` / ``model.depth`` stand for the model fields they decide. Raises
    ValueError when the settings do not resolve."""
    given = resolve_run(settings)
    paths = _leaf_paths(settings)
    for base in ("model.preset", "model.depth"):
        if base in paths:
            paths += [f"model.{f.name}" for f in fields(LMConfig) if f.name not in _NOT_FROM_BASE]

    def touched(path: str) -> bool:
        return any(path == p or path.startswith(p + ".") or p.startswith(path + ".") for p in paths)

    return config_diff(given.to_dict(), stored.to_dict(), only=touched)
