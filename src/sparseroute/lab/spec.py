"""Sweep specifications: a base run configuration, a list of variants that each change some of its
fields, and the seeds every variant is trained with. A spec is a Python object (the presets in
:mod:`sparseroute.lab.presets`) or a TOML file; both resolve to one validated
:class:`~sparseroute.train.config.RunConfig` per (variant, seed) before anything is trained.

TOML form::

    name = "my-sweep"
    seeds = [0, 1, 2]
    reference = "linear"          # optional: the variant the others are compared with (default: first)
    margin = 1.0                  # TOST equivalence margin in PPL (relative_margin = true: a fraction)

    [base.model]
    preset = "tiny"               # or depth = 4; any other LMConfig field overrides the preset
    [base.train]
    tokens = "300k"               # counts accept 300k / 2M
    [base.data]
    corpus = "stdlib"

    [[variants]]
    name = "linear"
    model.moe.router = "topk"

    [[variants]]
    name = "cosine-d32"
    model.moe = { router = "cosine", router_options = { d_space = 32 } }

    [[variants]]
    name = "dense"
    model.moe = false             # no MoE

    [[variants]]
    name = "moba-top4"            # block-sparse attention (see sparseroute.attention.AttentionConfig)
    model.attention = { router = "moba", router_options = { top_k = 4 } }

Variant fields merge into the base (nested tables merge key by key; a variant's ``model.moe`` table
starts from the base's MoE settings, or from the defaults when the base is dense). Every variant
of a seed sees the same data order (the data order follows ``train.seed``) and the same
validation and test text.

A variant may change only :data:`VARIANT_FIELDS` (the routing, and end-of-run diagnostics) of its
resolved run configuration; every other field must equal the first variant's for the same seed,
or the spec is refused when it is planned. ``allow_differences = ["train.lr"]`` (dotted paths of
``RunConfig.to_dict()``; a path covers its subtree) lets variants differ there deliberately, and
the report says so.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparseroute.lab.results import config_leaves, covered
from sparseroute.train.config import RunConfig, apply_setting, merge_settings, read_toml, resolve_run

__all__ = ["Variant", "SweepSpec", "PlannedRun", "load_spec", "VARIANT_FIELDS"]

_SPEC_KEYS = {"name", "description", "seeds", "base", "variants", "reference", "margin", "relative_margin",
              "allow_differences"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")

#: The only parts of a run configuration (dotted paths of ``RunConfig.to_dict()``, each covering its
#: subtree) in which the variants of a sweep may differ without ``allow_differences``: the MoE layers
#: (router, experts, hops; ``model.moe = false`` for dense), the sparse attention layers (router,
#: options, block size, layers; ``model.attention = false`` for dense attention), the weight sparsity
#: trained from scratch (``train.sparsity``, ``train.sparse_method``, ``train.sparse_options``) and the halting
#: thresholds evaluated after training, which do not change the training. An allowlist, so that a
#: field added to the run configuration later is held fixed across variants by default.
VARIANT_FIELDS = ("model.moe", "model.attention", "train.sparsity", "train.sparse_method", "train.sparse_options",
                  "train.halting_taus", "train.halting_quantiles")


@dataclass(frozen=True)
class Variant:
    """A named change to the base configuration (``overrides`` is nested like the base)."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PlannedRun:
    variant: str
    seed: int
    config: RunConfig


@dataclass(frozen=True)
class SweepSpec:
    """name: the sweep's name (also its folder). base: ``{"model": {...}, "data": {...},
    "train": {...}}`` where ``model`` may name a ``preset`` or a ``depth``. variants: in report
    order. seeds: every variant is trained once per seed. reference: the variant the report
    compares the others with. margin / relative_margin: the TOST equivalence margin (PPL, or a
    fraction of the reference's mean test PPL)."""

    name: str
    base: dict[str, Any]
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    description: str = ""
    reference: str | None = None
    margin: float = 1.0
    relative_margin: bool = False
    allow_differences: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ValueError(f"sweep name must be letters, digits and _.+- (no spaces or slashes); got {self.name!r}")
        if not isinstance(self.base, dict):
            raise ValueError(f"base must be a table of model / data / train settings; got {self.base!r}")
        unknown = sorted(set(self.base) - {"model", "data", "train"})
        if unknown:
            raise ValueError(f"base: unknown section(s) {', '.join(unknown)}; allowed: model, data, train")
        object.__setattr__(self, "variants", tuple(self.variants))
        if not self.variants:
            raise ValueError("variants: a sweep needs at least one variant")
        names = [v.name for v in self.variants]
        for n in names:
            if not isinstance(n, str) or not _NAME_RE.match(n):
                raise ValueError(f"variant name must be letters, digits and _.+- (no spaces); got {n!r}")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"variants: duplicate name(s) {', '.join(dup)}")
        seeds = tuple(self.seeds)
        object.__setattr__(self, "seeds", seeds)
        if not seeds or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
            raise ValueError(f"seeds must be a non-empty list of ints >= 0; got {list(seeds)!r}")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds: duplicates in {list(seeds)!r}")
        if self.reference is not None and self.reference not in names:
            raise ValueError(f"reference {self.reference!r} is not a variant; variants: {', '.join(names)}")
        if isinstance(self.margin, bool) or not isinstance(self.margin, (int, float)) or not self.margin > 0:
            raise ValueError(f"margin must be a number > 0; got {self.margin!r}")
        if not isinstance(self.relative_margin, bool):
            raise ValueError(f"relative_margin must be true or false; got {self.relative_margin!r}")
        allow = self.allow_differences
        if isinstance(allow, str) or not isinstance(allow, (list, tuple)):
            raise ValueError(f"allow_differences must be a list of dotted fields such as \"train.lr\"; got {allow!r}")
        for entry in allow:
            parts = entry.split(".") if isinstance(entry, str) else []
            if not parts or not all(parts) or parts[0] not in ("model", "data", "train"):
                raise ValueError(f"allow_differences: {entry!r} is not a dotted field of a run such as train.lr, "
                                 "model.d_model or data.corpus")
        object.__setattr__(self, "allow_differences", tuple(allow))

    # -- resolution --------------------------------------------------------------------------
    def variant_config(self, variant: Variant, seed: int) -> RunConfig:
        """The validated run configuration of one (variant, seed); errors name the variant and field."""
        try:
            return _resolve(self.base, variant.overrides, seed)
        except (ValueError, TypeError) as e:
            raise ValueError(f"sweep {self.name!r}, variant {variant.name!r}: {e}") from None

    def plan(self) -> list[PlannedRun]:
        """Every run of the sweep, variants in order, seeds within (validates all of them, and that
        the variants differ only where :data:`VARIANT_FIELDS` and ``allow_differences`` let them)."""
        runs = [PlannedRun(v.name, s, self.variant_config(v, s)) for v in self.variants for s in self.seeds]
        self._check_held_fixed(runs)
        return runs

    def _check_held_fixed(self, runs: list[PlannedRun]) -> None:
        """Refuse a variant whose resolved configuration differs from the first variant's (same seed)
        outside the allowed paths, naming every differing field with both values."""
        leaves = {(p.variant, p.seed): config_leaves(p.config.to_dict()) for p in runs}
        for entry in self.allow_differences:
            if not any(covered(path, (entry,)) for lv in leaves.values() for path in lv):
                raise ValueError(f"sweep {self.name!r}: allow_differences: {entry!r} is not a field of the run "
                                 "configuration (e.g. train.lr, model.d_model, data.corpus)")
        allowed = VARIANT_FIELDS + self.allow_differences
        first = self.variants[0].name
        changes: dict[str, dict[str, str]] = {}  # variant -> path -> "a -> b", in config order
        for p in runs:
            if p.variant == first:
                continue
            ref, own = leaves[(first, p.seed)], leaves[(p.variant, p.seed)]
            for path in list(ref) + [k for k in own if k not in ref]:
                a, b = ref.get(path, _ABSENT), own.get(path, _ABSENT)
                if a != b and not covered(path, allowed):
                    changes.setdefault(p.variant, {}).setdefault(path, f"{_show(a)} -> {_show(b)}")
        if changes:
            said = "; ".join(f"variant {v!r} changes " + ", ".join(f"{path} ({d})" for path, d in diff.items())
                             for v, diff in changes.items())
            raise ValueError(
                f"sweep {self.name!r}: {said} (against {first!r}); a sweep holds these fixed: its runs share the "
                f"model size, budget, batch shape, schedule, data and evaluation, and a variant may change only "
                f"{', '.join(VARIANT_FIELDS)}; list them in allow_differences to differ deliberately"
            )

    def ineffective_settings(self, settings: list[str]) -> list[str]:
        """The ``KEY=VALUE`` settings (as given to :meth:`with_changes`) that change the base but no
        run, because every variant sets that field itself (``model.moe.router=cosine`` when each
        variant names its router). A setting that changes nothing at all (the base's own value) is
        not listed; settings that do not resolve are left to :meth:`plan` to report."""
        settings = list(settings)
        if not settings:
            return []
        seed = self.seeds[0]

        def resolved(items: list[str]) -> tuple[list[dict], Any]:
            base = copy.deepcopy(self.base)
            for item in items:
                apply_setting(base, item)
            runs = [_resolve(base, v.overrides, seed).to_dict() for v in self.variants]
            try:
                return runs, _resolve(base, {}, seed).to_dict()
            except (ValueError, TypeError):
                return runs, base  # a base that only its variants complete: compare it as written

        try:
            everything = resolved(settings)
        except (ValueError, TypeError):
            return []
        out = []
        for i, item in enumerate(settings):
            try:
                without = resolved(settings[:i] + settings[i + 1:])
            except (ValueError, TypeError):
                continue  # the setting is what makes the runs valid: it has an effect
            if without[0] == everything[0] and without[1] != everything[1]:
                out.append(item)
        return out

    def with_changes(self, *, seeds: tuple[int, ...] | None = None, settings: list[str] | None = None,
                     margin: float | None = None, relative_margin: bool | None = None) -> "SweepSpec":
        """A copy with other seeds, ``KEY=VALUE`` settings applied to the base (``train.tokens=300k``,
        ``model.moe.top_k=1``), or another margin."""
        base = copy.deepcopy(self.base)
        for s in settings or []:
            apply_setting(base, s)
        return SweepSpec(
            name=self.name, base=base, variants=self.variants, seeds=self.seeds if seeds is None else tuple(seeds),
            description=self.description, reference=self.reference,
            margin=self.margin if margin is None else margin,
            relative_margin=self.relative_margin if relative_margin is None else relative_margin,
            allow_differences=self.allow_differences,
        )

    def to_dict(self) -> dict[str, Any]:
        d = {
            "name": self.name,
            "description": self.description,
            "base": self.base,
            "variants": [{"name": v.name, **v.overrides} for v in self.variants],
            "seeds": list(self.seeds),
            "reference": self.reference,
            "margin": self.margin,
            "relative_margin": self.relative_margin,
        }
        if self.allow_differences:  # absent when empty: specs stored before it existed read the same
            d["allow_differences"] = list(self.allow_differences)
        return d

    def fingerprint(self) -> str:
        """Hash of what decides the runs (the resolved configurations); the same spec written
        differently has the same fingerprint."""
        runs = [[p.variant, p.seed, p.config.to_dict()] for p in self.plan()]
        blob = json.dumps({"name": self.name, "runs": runs}, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, where: str = "spec") -> "SweepSpec":
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a table")
        unknown = sorted(set(d) - _SPEC_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_SPEC_KEYS))}")
        for key in ("name", "variants"):
            if key not in d:
                raise ValueError(f"{where}: missing {key!r}")
        variants = []
        for i, v in enumerate(d["variants"]):
            if not isinstance(v, dict) or "name" not in v:
                raise ValueError(f"{where}: variants[{i}] needs a name")
            rest = {k: val for k, val in v.items() if k != "name"}
            bad = sorted(set(rest) - {"model", "data", "train"})
            if bad:
                raise ValueError(
                    f"{where}: variant {v['name']!r}: unknown section(s) {', '.join(bad)}; allowed: model, data, train"
                )
            variants.append(Variant(v["name"], rest))
        return cls(
            name=d["name"], base=d.get("base", {}), variants=tuple(variants), seeds=tuple(d.get("seeds", (0, 1, 2))),
            description=d.get("description", ""), reference=d.get("reference"),
            margin=d.get("margin", 1.0), relative_margin=d.get("relative_margin", False),
            allow_differences=d.get("allow_differences", ()),
        )


def load_spec(path: str | Path) -> SweepSpec:
    """Read a TOML sweep spec; any problem raises ValueError naming the file and the field."""
    p = Path(path)
    spec = SweepSpec.from_dict(read_toml(p, "spec file"), where=str(p))
    spec.plan()  # validate every run now
    return spec


# -- internals --------------------------------------------------------------------------------

_ABSENT = object()


def _show(value: Any) -> str:
    return "absent" if value is _ABSENT else json.dumps(value, default=str)


def _resolve(base: dict[str, Any], overrides: dict[str, Any], seed: int) -> RunConfig:
    var_model = overrides.get("model", {})
    if isinstance(var_model, dict) and ("preset" in var_model or "depth" in var_model):
        raise ValueError("model.preset / model.depth belong in the base: every variant has the same model size")
    settings = merge_settings(base, overrides)
    train = settings.setdefault("train", {})
    if "seed" in train:
        raise ValueError("train.seed is set by the sweep's seeds; remove it from the spec")
    train["seed"] = seed
    return resolve_run(settings)
