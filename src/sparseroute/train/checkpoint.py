"""Checkpoints: safetensors for tensors, JSON for the rest, written to a temporary name and renamed.

Layout of a run directory::

    config.json                  the resolved RunConfig
    checkpoints/step-000123/     model.safetensors, optim.safetensors, state.json
    checkpoints/latest.json      {"step": 123, "dir": "step-000123"} (replaced atomically)

``state.json`` holds the step, the optimizer's param groups, RNG states (as tensors in
optim.safetensors), the metrics-log offset and the sha256 of both tensor files; loading checks
them and raises :class:`CheckpointError` (never overwriting anything) when they do not match.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sparseroute._testing import fault
from sparseroute.fileio import sha256_file, write_json_atomic

FORMAT = 1
KEEP = 2


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or does not belong to this run."""


def _optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, sc in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(sc)
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int = KEEP,
) -> Path:
    """Write checkpoint ``step`` (model, optimizer, RNG, ``state``) and point latest.json at it."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model_t = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    optim_t, optim_meta = _optimizer_to_tensors(optimizer)
    optim_t["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            optim_t[f"rng.cuda.{i}"] = s
    save_file(model_t, str(tmp / "model.safetensors"))
    save_file(optim_t, str(tmp / "optim.safetensors"))
    meta = {
        "format": FORMAT,
        "step": step,
        "optimizer": optim_meta,
        "state": state,
        "sha256": {f: sha256_file(tmp / f) for f in ("model.safetensors", "optim.safetensors")},
    }
    write_json_atomic(tmp / "state.json", meta)
    fault("checkpoint_written", step)
    final = ckpt_root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_json_atomic(ckpt_root / "latest.json", {"step": step, "dir": name})
    older = sorted(p for p in ckpt_root.glob("step-*") if p.name != name)
    for p in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The directory latest.json points at, or None when the run has no checkpoint yet."""
    latest = Path(run_dir) / "checkpoints" / "latest.json"
    if not latest.exists():
        return None
    try:
        info = json.loads(latest.read_text())
        return latest.parent / info["dir"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{latest} is unreadable ({e}); the run cannot be resumed from it") from None


def load_checkpoint(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict, dict[str, torch.Tensor], dict]:
    """Read and verify a checkpoint: (model tensors, optimizer state_dict, RNG tensors, meta)."""
    ckpt = Path(ckpt)
    state_path = ckpt / "state.json"
    try:
        meta = json.loads(state_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: state.json is missing") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {ckpt} is corrupt: state.json is not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {ckpt} has format {meta.get('format')!r}; this version reads {FORMAT}")
    for fname, digest in meta.get("sha256", {}).items():
        path = ckpt / fname
        if not path.exists():
            raise CheckpointError(f"checkpoint {ckpt} is incomplete: {fname} is missing")
        if sha256_file(path) != digest:
            raise CheckpointError(
                f"checkpoint {ckpt} is corrupt: {fname} does not match its recorded sha256 (truncated or modified)"
            )
    # clone: safetensors hands out tensors at arbitrary byte offsets, and vectorised CPU kernels
    # can round differently on unaligned memory, which would break bit-identical resume
    model_t = {k: v.clone() for k, v in load_file(str(ckpt / "model.safetensors")).items()}
    optim_t = {k: v.clone() for k, v in load_file(str(ckpt / "optim.safetensors")).items()}
    rng = {k: v for k, v in optim_t.items() if k.startswith("rng.")}
    optim_sd = _optimizer_from_tensors({k: v for k, v in optim_t.items() if not k.startswith("rng.")}, meta["optimizer"])
    return model_t, optim_sd, rng, meta


def restore_rng(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["rng.torch"])
    cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
