"""Training configuration: the run = model + data + optimisation, each a frozen dataclass."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from sparseroute.data import DataConfig
from sparseroute.models import LMConfig

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

    def __post_init__(self) -> None:
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

    @property
    def steps(self) -> int:
        return self.tokens // (self.batch_size * self.seq_len)

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based): linear warmup, cosine decay."""
        n = self.steps
        warm = max(1, int(round(self.warmup_fraction * n))) if self.warmup_fraction > 0 else 0
        if step < warm:
            return self.lr * (step + 1) / warm
        progress = (step - warm) / max(1, n - warm)
        floor = self.lr * self.min_lr_ratio
        return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


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
        return {"model": self.model.to_dict(), "data": asdict(self.data), "train": asdict(self.train)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        unknown = set(d) - {"model", "data", "train"}
        if unknown:
            raise ValueError(f"unknown run config section(s): {', '.join(sorted(unknown))}")
        return cls(
            model=LMConfig.from_dict(d["model"]),
            data=_build(DataConfig, d.get("data", {})),
            train=_build(TrainConfig, d.get("train", {})),
        )


def _build(cls, d: dict[str, Any]):
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
    return cls(**d)
