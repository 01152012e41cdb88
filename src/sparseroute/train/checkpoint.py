"""Checkpoints: safetensors for tensors, JSON for the rest, each checkpoint verifiable on its own.

Layout of a run directory::

    config.json                  the resolved RunConfig
    .lock                        held (an OS lock) by the process training the run
    checkpoints/step-000123/     model.safetensors, optim.safetensors, state.json, manifest.json
    checkpoints/latest.json      {"step": 123, "dir": "step-000123"}: a pointer for people and scripts

``state.json`` holds the step, the optimizer's param groups, the metrics-log offset and the
training loop's state; RNG states and optimizer tensors are in optim.safetensors.
``manifest.json`` lists the sha256 of every other file of the checkpoint and the step, and carries
a checksum of its own content, so that a checkpoint is complete and intact exactly when its
manifest verifies; a damaged or edited file is named in a :class:`CheckpointError`, and loading
never writes anything.

A checkpoint is written into ``checkpoints/.tmp-step-N-PID``, renamed to ``step-N`` when every
file (the manifest last) is on disk, and only then published in ``latest.json``. sparseroute
finds checkpoints by listing the ``step-*`` folders, not through ``latest.json``: a missing or
damaged pointer loses nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sparseroute._testing import fault
from sparseroute.fileio import sha256_file, write_json_atomic

__all__ = [
    "CheckpointError",
    "Checkpoint",
    "save_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "verify_checkpoint",
    "find_checkpoint",
    "load_checkpoint",
    "remove_temporary",
    "restore_rng",
]

FORMAT = 2
KEEP = 2
MANIFEST = "manifest.json"
_FILES = ("model.safetensors", "optim.safetensors", "state.json")
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or does not belong to this run."""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder of a run; ``meta`` is its state.json once verified (by
    :func:`find_checkpoint`), so that loading it does not check every file a second time."""

    step: int
    path: Path
    meta: dict | None = None


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


def _manifest_digest(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "self_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int = KEEP,
) -> Path:
    """Write checkpoint ``step`` (model, optimizer, RNG, ``state``), publish it, and remove the
    checkpoints older than the ``keep`` newest."""
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
    write_json_atomic(tmp / "state.json", {"format": FORMAT, "step": step, "optimizer": optim_meta, "state": state})
    manifest: dict[str, Any] = {"format": FORMAT, "step": step, "sha256": {f: sha256_file(tmp / f) for f in _FILES}}
    manifest["self_sha256"] = _manifest_digest(manifest)
    write_json_atomic(tmp / MANIFEST, manifest)
    fault("checkpoint_written", step)
    final = ckpt_root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_json_atomic(ckpt_root / "latest.json", {"step": step, "dir": name})
    older = [c for c in list_checkpoints(run_dir) if c.step < step]
    for c in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(c.path, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """The run's checkpoint folders (``checkpoints/step-N``), oldest first, whether or not they
    verify; temporary folders of unfinished writes are not checkpoints."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append(Checkpoint(int(m.group(1)), p))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint folder of the run (not verified), or None when it has none."""
    found = list_checkpoints(run_dir)
    return found[-1].path if found else None


def verify_checkpoint(ckpt: Path) -> dict[str, Any]:
    """Check that every file of a checkpoint is present and unchanged; returns its state.json.
    A problem raises :class:`CheckpointError` naming the checkpoint and the file."""
    ckpt = Path(ckpt)
    manifest_path = ckpt / MANIFEST
    if not manifest_path.exists() and (ckpt / "state.json").exists():
        return _verify_format_1(ckpt)
    manifest = _read_json(ckpt, MANIFEST, "incomplete: manifest.json is missing (its write did not finish)")
    if not isinstance(manifest, dict) or manifest.get("self_sha256") != _manifest_digest(manifest):
        raise CheckpointError(f"checkpoint {ckpt} is corrupt: manifest.json does not match its own checksum (modified)")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {ckpt} has format {manifest.get('format')!r}; this version reads {FORMAT}")
    digests = manifest.get("sha256", {})
    _check_digests(ckpt, {fname: digests.get(fname) for fname in _FILES})
    meta = _read_json(ckpt, "state.json", "incomplete: state.json is missing")
    m = _STEP_DIR.match(ckpt.name)
    if meta.get("step") != manifest.get("step") or (m is not None and int(m.group(1)) != manifest.get("step")):
        raise CheckpointError(
            f"checkpoint {ckpt} is corrupt: its folder, manifest.json and state.json disagree on the step"
        )
    return meta


def _verify_format_1(ckpt: Path) -> dict[str, Any]:
    """Checkpoints written before the manifest: state.json lists the tensor files' sha256 (and is
    not itself covered)."""
    meta = _read_json(ckpt, "state.json", "incomplete: state.json is missing")
    if meta.get("format") != 1:
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: manifest.json is missing")
    _check_digests(ckpt, meta.get("sha256", {}))
    return meta


def _check_digests(ckpt: Path, digests: dict[str, str | None]) -> None:
    """Every named file of the checkpoint exists and has its recorded sha256."""
    for fname, digest in digests.items():
        path = ckpt / fname
        if not path.exists():
            raise CheckpointError(f"checkpoint {ckpt} is incomplete: {fname} is missing")
        if sha256_file(path) != digest:
            raise CheckpointError(
                f"checkpoint {ckpt} is corrupt: {fname} does not match its recorded sha256 (truncated or modified)"
            )


def _read_json(ckpt: Path, fname: str, missing: str) -> Any:
    try:
        return json.loads((ckpt / fname).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt} is {missing}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {ckpt} is corrupt: {fname} is not valid JSON ({e})") from None


def find_checkpoint(run_dir: Path, step: int | None = None) -> Checkpoint | None:
    """The checkpoint to resume or evaluate: ``step``'s, or the newest. Returns None when the run
    has no checkpoint folder at all; raises :class:`CheckpointError` when the chosen one does not
    verify, naming the file at fault and the newest earlier checkpoint that does (to be chosen
    explicitly: nothing falls back on its own)."""
    found = list_checkpoints(run_dir)
    if step is not None:
        chosen = [c for c in found if c.step == step]
        if not chosen:
            have = ", ".join(str(c.step) for c in found) or "none"
            raise CheckpointError(f"{run_dir} has no checkpoint of step {step} (checkpoints: {have})")
    elif not found:
        return None
    target = chosen[0] if step is not None else found[-1]
    try:
        meta = verify_checkpoint(target.path)
    except CheckpointError as e:
        earlier = None
        for c in reversed([c for c in found if c.step < target.step]):
            try:
                verify_checkpoint(c.path)
            except CheckpointError:
                continue
            earlier = c
            break
        if earlier is None:
            listed = ", ".join(c.path.name for c in found)
            raise CheckpointError(f"{e}; no earlier checkpoint is intact either ({listed}); nothing was changed") from None
        raise CheckpointError(
            f"{e}; nothing was changed. The newest intact checkpoint is step {earlier.step}; choose it with "
            f"--from {earlier.step}"
        ) from None
    return Checkpoint(target.step, target.path, meta)


def load_checkpoint(ckpt: Path | Checkpoint) -> tuple[dict[str, torch.Tensor], dict, dict[str, torch.Tensor], dict]:
    """Read a checkpoint: (model tensors, optimizer state_dict, RNG tensors, state.json). A folder
    is verified first; a :class:`Checkpoint` from :func:`find_checkpoint` already was."""
    if isinstance(ckpt, Checkpoint) and ckpt.meta is not None:
        ckpt, meta = ckpt.path, ckpt.meta
    else:
        ckpt = Path(ckpt.path if isinstance(ckpt, Checkpoint) else ckpt)
        meta = verify_checkpoint(ckpt)
    # clone: safetensors hands out tensors at arbitrary byte offsets, and vectorised CPU kernels
    # can round differently on unaligned memory, which would break bit-identical resume
    model_t = {k: v.clone() for k, v in load_file(str(ckpt / "model.safetensors")).items()}
    optim_t = {k: v.clone() for k, v in load_file(str(ckpt / "optim.safetensors")).items()}
    rng = {k: v for k, v in optim_t.items() if k.startswith("rng.")}
    optim_sd = _optimizer_from_tensors({k: v for k, v in optim_t.items() if not k.startswith("rng.")}, meta["optimizer"])
    return model_t, optim_sd, rng, meta


def remove_temporary(run_dir: Path) -> list[Path]:
    """Remove the temporary folders of checkpoint writes that never finished (``.tmp-step-N-PID``);
    called by the process holding the run's lock, so no live writer owns them. Returns them."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    gone = [p for p in root.iterdir() if p.name.startswith(".tmp-step-") and p.is_dir()]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def restore_rng(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["rng.torch"])
    cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
