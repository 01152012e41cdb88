"""The training loop: fixed token budget, AdamW + warmup/cosine, MoE auxiliary losses and hooks,
routing statistics (MoE and sparse attention), FLOPs accounting, NaN guard, checkpoints and
bit-identical resume.

Each ``metrics.jsonl`` record (every ``log_every`` steps) holds interval means: ``loss``,
``aux_loss``, for MoE models ``routing`` (one dict per MoE layer) and for models with sparse
attention ``attention`` (each scalar statistic of the layers' ``BlockRouting.stats`` — density,
blocks_per_query, recall, mass, ... — averaged over the sparse layers, then over the interval's
steps), and for runs with sparse weights (``train.sparsity``) ``sparse``: the share of mask bits
flipped since the previous record (``sad``) and since the start (``sad_total``), and the sparsity
(:class:`sparseroute.weights.training.SparseTraining`). Wall-clock time is kept out of the log (a
resumed run writes it bit-identically); the final metrics carry ``train_seconds`` and
``step_seconds``, the mean time of one training step (batch, forward, backward, optimizer;
evaluations and checkpoints excluded).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from sparseroute._testing import fault
from sparseroute.data import TokenizedCorpus, get_batch
from sparseroute.evaluation import evaluate
from sparseroute.evaluation.diagnostics import (
    expert_specialisation,
    halting_choice,
    halting_taus,
    router_expert_coupling,
    routing_fluctuation,
)
from sparseroute.fileio import LockBusy, check_folder_path, file_lock, write_json_atomic
from sparseroute.models import TransformerLM, flops_per_token
from sparseroute.models.flops import parameter_counts
from sparseroute.train.checkpoint import (
    CheckpointError,
    find_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    remove_temporary,
    restore_rng,
    save_checkpoint,
)
from sparseroute.train.config import RunConfig, config_diff
from sparseroute.train.corpus import corpus_for, prepare_run
from sparseroute.weights.dynamic import sparse_summary
from sparseroute.weights.training import SparseTraining, check_sparse_fit, sparsify_for_training


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: training stopped; the checkpoints written so far are kept."""


class RunDirError(ValueError):
    """The output directory does not fit the request (exists, or holds another run)."""


class RunBusy(RunDirError):
    """Another live process is training the run in this folder."""


def make_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """torch's LambdaLR with the run's warmup + cosine factor (``TrainConfig.lr_factor``): it sets
    step 0's rate when built and the next step's after each ``step()``; its state goes into the
    checkpoints, so a resumed run continues the schedule exactly."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, cfg.lr_factor)


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused CPU kernel is faster than the per-tensor loop and no less reproducible (the rare
    # two-thread divergence described in docs/training.md shows with either)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (2-norm), with the same total norm and the same gradients
    to the bit, but without its multiply when the factor it would apply is 1 (the norm is within
    ``max_norm``), which in most steps of a typical run saves a full pass over the gradients: on
    the CPU, checking the factor costs nothing."""
    params = [p for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
    # torch multiplies by min(max_norm / (total + 1e-6), 1); multiplying by 1 changes nothing
    if not bool(max_norm / (total + 1e-6) >= 1.0):  # NaN multiplies too, as in torch
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


@dataclass
class _Accum:
    """Per-interval sums (saved in checkpoints so a resumed run logs exactly the same lines)."""

    loss: float = 0.0
    aux: float = 0.0
    n: int = 0
    layers: list | None = None  # per MoE layer: {"load": [...], scalar sums...}
    active_sum: list | None = None  # whole-run sums of active experts per token, per MoE layer
    active_n: int = 0
    val_points: list | None = None  # [step, validation loss] at the convergence check's steps
    attention: dict | None = None  # interval sums of the sparse attention stats (mean over layers)
    step_seconds: float = 0.0  # whole-run sum of the timed training steps' wall-clock seconds
    timed_steps: int = 0

    def add_routings(self, routings) -> None:
        if not routings:
            return
        if self.layers is None:
            self.layers = [{"load": [0] * int(r.num_experts)} for r in routings]
            self.active_sum = [0.0] * len(routings)
        for i, r in enumerate(routings):
            lay = self.layers[i]
            load = r.stats["tokens_per_expert"].tolist()
            lay["load"] = [a + b for a, b in zip(lay["load"], load)]
            for key, value in r.stats.items():
                if key != "tokens_per_expert" and value.numel() == 1:
                    lay[key] = lay.get(key, 0.0) + float(value)
            self.active_sum[i] += float(r.stats["active_per_token"])
        self.active_n += 1

    def add_attention(self, attention_routings) -> None:
        """Add one step's sparse attention statistics: each scalar stat averaged over the layers
        that have it."""
        if not attention_routings:
            return
        if self.attention is None:
            self.attention = {}
        sums: dict[str, list[float]] = {}
        for r in attention_routings:
            for key, value in r.stats.items():
                if value.numel() == 1:
                    sums.setdefault(key, []).append(float(value))
        for key, values in sums.items():
            self.attention[key] = self.attention.get(key, 0.0) + sum(values) / len(values)

    def interval_record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {"loss": self.loss / max(1, self.n), "aux_loss": self.aux / max(1, self.n)}
        if self.layers is not None:
            rec["routing"] = [
                {k: (v if k == "load" else v / max(1, self.n)) for k, v in lay.items()} for lay in self.layers
            ]
        if self.attention is not None:
            rec["attention"] = {k: v / max(1, self.n) for k, v in sorted(self.attention.items())}
        return rec

    def reset_interval(self) -> None:
        self.loss, self.aux, self.n = 0.0, 0.0, 0
        if self.layers is not None:
            self.layers = [{"load": [0] * len(lay["load"])} for lay in self.layers]
        if self.attention is not None:
            self.attention = {}

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _restore_schedule(scheduler, meta: dict, tc) -> None:
    """The scheduler's state from a checkpoint; a checkpoint written before the schedule kept one
    (it set each step's rate itself) continues at the same rates."""
    state = meta["state"].get("scheduler")
    if state is not None:
        scheduler.load_state_dict(state)
        return
    step = int(meta["step"])
    scheduler.last_epoch = step
    for group in scheduler.optimizer.param_groups:
        group["lr"] = tc.lr_at(step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def _check_finite(step: int, name: str, value: torch.Tensor, saved: int | None) -> None:
    if not torch.isfinite(value).all():
        kept = ("the last good checkpoint (step {}) is kept".format(saved) if saved is not None
                else "no checkpoint had been written yet")
        raise TrainingDiverged(f"step {step}: {name} is {float(value.detach())}; training stopped, {kept}")


def read_run_config(cfg_path: Path) -> RunConfig:
    """A run folder's config.json; a damaged one raises :class:`RunDirError` naming it."""
    try:
        return RunConfig.from_dict(json.loads(cfg_path.read_text(encoding="utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise RunDirError(f"{cfg_path} is unreadable ({e})") from None


def _planned_run(out: Path, cfg: RunConfig | None, resume: bool) -> RunConfig:
    """The run to train in ``out``: the stored one (``resume``; ``cfg``, when given, must resolve to
    it) or ``cfg`` (a folder that holds no run yet). Reads only; nothing is written."""
    cfg_path = out / "config.json"
    if resume:
        if not cfg_path.exists():
            raise RunDirError(f"--resume: {out} holds no run (no config.json); start it without --resume")
        stored = read_run_config(cfg_path)
        if cfg is not None and cfg.to_dict() != stored.to_dict():
            diff = config_diff(cfg.to_dict(), stored.to_dict())
            raise RunDirError(f"--resume: the options differ from the run stored in {out} ({diff}); drop them")
        return stored
    if cfg is None:
        raise ValueError("a RunConfig is needed to start a run")
    if cfg_path.exists() or (out / "checkpoints").exists():
        raise RunDirError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    return cfg


def check_device(name: str) -> torch.device:
    """The training device, when this machine has it."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} but no CUDA device is available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device={name} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_splits(corpus: TokenizedCorpus, tc) -> None:
    """Every split holds what the run reads from it: the training split at least one window of
    ``seq_len + 1`` tokens, validation and test at least one evaluation window within
    ``eval_tokens`` (checked before anything is written or trained)."""
    need = tc.seq_len + 1
    for name, tokens, cap in (("training", corpus.train, None), ("validation", corpus.val, tc.eval_tokens),
                              ("test", corpus.test, tc.eval_tokens)):
        have = len(tokens) if cap is None else min(len(tokens), cap)
        if have < need and have < len(tokens):  # the evaluation budget is what is short
            raise ValueError(f"train.eval_tokens={cap} is less than one evaluation window of seq_len+1 = {need} "
                             f"tokens; raise eval_tokens or shorten seq_len")
        if have < need:
            raise ValueError(
                f"the {name} split has {have} tokens, fewer than one window of seq_len+1 = {need}; use a larger "
                "corpus (data.max_bytes, data.val_fraction / test_fraction) or a shorter seq_len"
            )


def train(
    cfg: RunConfig | None,
    out_dir: str | Path,
    *,
    resume: bool = False,
    resume_from: int | None = None,
    progress: bool = True,
    corpus: TokenizedCorpus | None = None,
    on_log: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """Train (or resume) the run in ``out_dir``; returns the final metrics (also in final.json).

    Everything is checked before anything is written into ``out_dir`` (the folder, the device,
    the corpus and its splits, the vocabulary). While it trains, the process holds a lock on the
    folder (another process refuses with :class:`RunBusy`). ``resume`` continues from the newest
    checkpoint, or from step ``resume_from``'s (the checkpoints after it are then removed: the
    resumed run writes them again); a checkpoint that does not verify stops it with a
    :class:`CheckpointError` naming the file, and nothing is changed."""
    out = Path(out_dir)
    check_folder_path(out, "the run folder")
    if resume_from is not None and not resume:
        raise ValueError("resume_from needs resume=True (--from needs --resume)")
    cfg = _planned_run(out, cfg, resume)
    tc = cfg.train
    device = check_device(tc.device)
    check_sparse_model(cfg)
    if corpus is None:
        fitted, corpus = prepare_run(cfg, progress=progress)
        if fitted != cfg:  # a stored run whose corpus no longer gives the vocabulary it trained with
            raise ValueError(
                f"model vocab_size={cfg.model.vocab_size} but the {cfg.data.tokenizer} tokenizer has {corpus.vocab_size}"
            )
    elif corpus.vocab_size != cfg.model.vocab_size:
        raise ValueError(
            f"model vocab_size={cfg.model.vocab_size} but the {cfg.data.tokenizer} tokenizer has {corpus.vocab_size}; "
            "fit the run to its corpus first (sparseroute.train.prepare_run)"
        )
    check_splits(corpus, tc)
    out.mkdir(parents=True, exist_ok=True)
    try:
        lock = file_lock(out / ".lock", timeout=0)
    except LockBusy:
        raise RunBusy(f"{out} is being trained by another process; wait for it to finish or stop it") from None
    with lock:
        return _train_locked(cfg, out, resume, resume_from, corpus, device, progress, on_log)


def _train_locked(cfg: RunConfig, out: Path, resume: bool, resume_from: int | None, corpus: TokenizedCorpus,
                  device: torch.device, progress: bool, on_log: Callable[[dict], None] | None) -> dict[str, Any]:
    tc = cfg.train
    cfg_path = out / "config.json"
    if not resume:
        if cfg_path.exists():  # another process started a run here since the check
            raise RunDirError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        write_json_atomic(cfg_path, cfg.to_dict())
    remove_temporary(out)  # unfinished checkpoint writes of killed processes (none is alive: the lock)
    ckpt = find_checkpoint(out, resume_from) if resume else None
    if resume and ckpt is None and (out / "final.json").exists():
        raise RunDirError(f"{out} holds a finished run (final.json) but no checkpoint; nothing to resume")

    torch.manual_seed(tc.seed)
    model = build_model(cfg).to(device)
    sparse_cfg = tc.sparse_training()
    sparse = None if sparse_cfg is None else SparseTraining(model, sparse_cfg, total_steps=tc.steps, seed=tc.seed)
    optimizer = make_optimizer(model, tc)
    scheduler = make_scheduler(optimizer, tc)
    acc = _Accum()
    start, elapsed_before, saved = 0, 0.0, None
    metrics_path = out / "metrics.jsonl"
    if ckpt is not None:
        model_t, optim_sd, rng, meta = load_checkpoint(ckpt)
        try:
            model.load_state_dict(model_t, strict=True)
            optimizer.load_state_dict(optim_sd)
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {ckpt.path} does not fit this run's model: {e}") from None
        _restore_schedule(scheduler, meta, tc)
        restore_rng(rng)
        start = saved = int(meta["step"])
        st = meta["state"]
        acc = _Accum(**st["accum"])
        elapsed_before = float(st.get("elapsed_s", 0.0))
        offset = int(st["metrics_offset"])
        for later in list_checkpoints(out):  # only with resume_from: the continuation it replaces
            if later.step > ckpt.step:
                shutil.rmtree(later.path)
    else:
        offset = 0  # a fresh run, or one killed before its first checkpoint: its log starts over
    # the metrics log continues exactly where the checkpoint left it (nothing counted twice)
    with open(metrics_path, "a+b") as f:
        f.truncate(offset)

    steps = tc.steps
    tokens_per_step = tc.batch_size * tc.seq_len
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start, unit="step", file=sys.stderr, dynamic_ncols=True, leave=True)

    def log(record: dict) -> None:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if on_log is not None:
            on_log(record)

    def state_now(step: int) -> dict:
        return {
            "accum": acc.to_json(),
            "scheduler": scheduler.state_dict(),
            "metrics_offset": metrics_path.stat().st_size,
            "elapsed_s": elapsed_before + time.perf_counter() - t0,
            "tokens_seen": step * tokens_per_step,
        }

    check_steps = convergence_steps(steps)
    model.train()
    for step in range(start, steps):
        t_step = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        x, y = get_batch(corpus.train, tc.batch_size, tc.seq_len, step, tc.seed)
        x, y = x.to(device), y.to(device)
        if sparse is not None:
            sparse.begin_step(step)
        out_ = model(x)
        ce = F.cross_entropy(out_.logits.reshape(-1, out_.logits.shape[-1]).float(), y.reshape(-1))
        _check_finite(step, "the loss (cross-entropy)", ce, saved)
        for name, value in out_.aux_losses.items():
            _check_finite(step, f"the auxiliary loss {name!r}", value, saved)
        aux = out_.aux_loss()
        loss = ce + aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = clip_grad_norm(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        _check_finite(step, "the gradient norm", gnorm, saved)
        optimizer.step()
        scheduler.step()
        model.after_optimizer_step()
        if sparse is not None:
            sparse.after_optimizer_step(step, optimizer)
        acc.loss += float(ce.detach())
        acc.aux += float(aux.detach())
        acc.n += 1
        acc.add_routings(out_.routings)
        acc.add_attention(out_.attention_routings)
        acc.step_seconds += time.perf_counter() - t_step  # after the float()s above: synchronised on CUDA
        acc.timed_steps += 1
        done = step + 1
        fault("after_step", done)
        if bar is not None:
            bar.update(1)
            rate = (done - start) * tokens_per_step / max(1e-9, time.perf_counter() - t0)
            bar.set_postfix(loss=f"{float(ce.detach()):.3f}", tok_s=f"{rate:,.0f}", refresh=False)
        if (tc.log_every and done % tc.log_every == 0) or done == steps:
            rec = {"step": done, "tokens": done * tokens_per_step, "lr": lr, **acc.interval_record()}
            acc.reset_interval()
            if sparse is not None:
                rec["sparse"] = sparse.log_record()
            if tc.eval_every and done % tc.eval_every == 0 and done != steps:
                rec["val"] = evaluate(model, corpus.val, tc.batch_size, tc.seq_len, tc.eval_tokens, device)
            log(rec)
        if done in check_steps:  # before the checkpoint of this step, so that it holds the point
            loss = evaluate(model, corpus.val, tc.batch_size, tc.seq_len, tc.eval_tokens, device)["loss"]
            acc.val_points = [*(acc.val_points or []), [done, loss]]
        if tc.checkpoint_every and done % tc.checkpoint_every == 0 and done != steps:
            save_checkpoint(out, done, model, optimizer, state_now(done))
            saved = done
    if bar is not None:
        bar.close()

    final = finish(model, cfg, corpus, acc, device, out)
    final["train_seconds"] = elapsed_before + time.perf_counter() - t0
    if acc.timed_steps:
        final["step_seconds"] = acc.step_seconds / acc.timed_steps
    if start < steps:
        final["tokens_per_s"] = (steps - start) * tokens_per_step / max(1e-9, time.perf_counter() - t0)
    last = latest_checkpoint(out)
    if last is None or last.name != f"step-{steps:06d}":
        save_checkpoint(out, steps, model, optimizer, state_now(steps))
    write_json_atomic(out / "final.json", final)
    return final


def _diagnostics(model: TransformerLM, cfg: RunConfig, corpus: TokenizedCorpus, out: Path | None) -> dict[str, Any]:
    """Router diagnostics at the end of a MoE run: router-expert coupling, expert specialisation on
    validation text, and routing fluctuation against the newest earlier checkpoint."""

    tc = cfg.train
    n = min(tc.eval_tokens, 16_384)
    kw = {"batch_size": tc.batch_size, "seq_len": tc.seq_len, "max_tokens": n}
    res: dict[str, Any] = {
        "router_expert_coupling": router_expert_coupling(model),
        "expert_specialisation": expert_specialisation(model, corpus.val, top=5, **kw),
    }
    if out is not None:
        earlier = [c for c in list_checkpoints(out) if c.step < tc.steps]
        try:
            model_t, _, _, meta = load_checkpoint(earlier[-1].path) if earlier else (None, None, None, None)
        except CheckpointError as e:  # a diagnostic is not worth losing the run's end for
            print(f"routing fluctuation skipped: {e}", file=sys.stderr)
            model_t = None
        if model_t is not None:
            before = build_model(cfg).to(next(model.parameters()).device)
            before.load_state_dict(model_t, strict=True)
            res["routing_fluctuation"] = {
                "from_step": int(meta["step"]), "to_step": tc.steps,
                "per_layer": routing_fluctuation(before, model, corpus.val, **kw),
            }
    return res


#: the convergence check looks at the last this share of training
CONVERGENCE_WINDOW = 0.2
#: a run whose validation loss fell by more than this share of itself over the window is flagged
#: as still falling: equivalence at such a point says little about where the runs end up (a 3%
#: PPL margin is about 1% of a loss near 3 nats)
CONVERGENCE_FLAG = 0.01


def convergence_steps(steps: int) -> list[int]:
    """The steps before the end at which validation loss is measured for the convergence check:
    the start and the middle of the last :data:`CONVERGENCE_WINDOW` of training (the end is the
    final evaluation)."""
    start = round(steps * (1 - CONVERGENCE_WINDOW))
    return sorted({s for s in (start, round(steps * (1 - CONVERGENCE_WINDOW / 2))) if 0 < s < steps})


def convergence(points: list, final_step: int, final_loss: float) -> dict[str, Any] | None:
    """The convergence check of a run from its validation losses over the last part of training:
    ``relative_slope``, the least-squares slope of the loss against the share of training done,
    divided by the final loss (per whole run: -0.05 means falling at 5% of the loss per run length);
    ``relative_change``, the change over the window as a share of the loss at its start; and
    ``still_falling`` when that fall exceeds :data:`CONVERGENCE_FLAG`. None when fewer than two
    distinct steps were measured (a run of a handful of steps)."""
    pts = sorted({int(s): float(v) for s, v in [*(points or []), [final_step, final_loss]]}.items())
    if len(pts) < 2:
        return None
    xs = [s / final_step for s, _ in pts]
    ys = [v for _, v in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    change = (ys[-1] - ys[0]) / ys[0]
    return {"points": [[s, v] for s, v in pts], "window": CONVERGENCE_WINDOW, "relative_slope": slope / ys[-1],
            "relative_change": change, "still_falling": change < -CONVERGENCE_FLAG}


def finish(model: TransformerLM, cfg: RunConfig, corpus: TokenizedCorpus, acc: _Accum, device,
           out: Path | None = None) -> dict[str, Any]:
    tc = cfg.train
    val = evaluate(model, corpus.val, tc.batch_size, tc.seq_len, tc.eval_tokens, device)
    test = evaluate(model, corpus.test, tc.batch_size, tc.seq_len, tc.eval_tokens, device)
    active = None
    if acc.active_sum is not None and acc.active_n:
        active = [s / acc.active_n for s in acc.active_sum]
    flops = flops_per_token(cfg.model, tc.seq_len, active)
    extra: dict[str, Any] = {}
    if "routing" in val:
        extra["routing_profile"] = val["routing"]
        extra["diagnostics"] = _diagnostics(model, cfg, corpus, out)
    if "attention" in val:
        extra["attention_profile"] = val["attention"]
    if tc.sparsity is not None:
        extra["sparse"] = sparse_summary(model)
    moe = cfg.model.moe
    if (tc.halting_taus or tc.halting_quantiles) and moe is not None and moe.hops > 1:
        kw = {"batch_size": tc.batch_size, "seq_len": tc.seq_len, "max_tokens": tc.eval_tokens}
        taus = list(tc.halting_taus)
        if tc.halting_quantiles:
            taus += halting_taus(model, corpus.val, tc.halting_quantiles, **kw)
        choice = halting_choice(model, corpus.val, corpus.test, sorted(set(taus)), **kw)
        extra["halting"] = choice["validation"]  # the curve, on validation text
        extra["halting_test"] = {k: v for k, v in choice.items() if k != "validation"}
    return {**extra, 
        "steps": tc.steps,
        "tokens": tc.steps * tc.batch_size * tc.seq_len,
        "val_loss": val["loss"],
        "val_ppl": val["ppl"],
        "test_loss": test["loss"],
        "test_ppl": test["ppl"],
        "eval_tokens": val["tokens"],
        "eval_windows": {"val": val["windows"], "test": test["windows"]},
        "convergence": convergence(acc.val_points or [], tc.steps, val["loss"]),
        "flops_per_token": flops,
        "active_experts_per_layer": active,
        "parameters": sum(p.numel() for p in model.parameters()),
        "parameter_counts": parameter_counts(cfg.model),
    }


def build_model(cfg: RunConfig) -> TransformerLM:
    """The run's model, freshly initialised from the current RNG state (the one place a run's
    model is made: training, evaluation and pruning all load checkpoints into it); with
    ``train.sparsity`` its linears (not the head) are the sparse method's layers."""
    model = TransformerLM(cfg.model)
    sparse = cfg.train.sparse_training()
    if sparse is not None:
        sparsify_for_training(model, sparse, seed=cfg.train.seed)
    return model


def check_sparse_model(cfg: RunConfig) -> None:
    """Raise ValueError when the run's sparsity does not fit its model's linears (checked on a
    model built on the meta device, before anything is written)."""
    sparse = cfg.train.sparse_training()
    if sparse is None:
        return
    with torch.device("meta"):
        model = TransformerLM(cfg.model)
    try:
        check_sparse_fit(model, sparse)
    except ValueError as e:
        raise ValueError(f"train.sparsity={sparse.sparsity} does not fit the model: {e}") from None


def load_run_model(out_dir: str | Path, *, step: int | None = None) -> tuple[TransformerLM, RunConfig, dict]:
    """A run folder's model at its newest checkpoint (or ``step``'s), on the CPU, with the run's
    config and the checkpoint's metadata."""
    out = Path(out_dir)
    cfg_path = out / "config.json"
    if not cfg_path.exists():
        raise RunDirError(f"{out} holds no run (no config.json)")
    cfg = read_run_config(cfg_path)
    ckpt = find_checkpoint(out, step)
    if ckpt is None:
        raise RunDirError(f"{out} has no checkpoint yet")
    model_t, _, _, meta = load_checkpoint(ckpt)
    model = build_model(cfg)
    try:
        model.load_state_dict(model_t, strict=True)
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {ckpt.path} does not fit this run's model: {e}") from None
    return model, cfg, meta


def evaluate_run(out_dir: str | Path, *, step: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Validation and test perplexity of the newest checkpoint of a run (or of ``step``'s)."""
    out = Path(out_dir)
    cfg_path = out / "config.json"
    if not cfg_path.exists():
        raise RunDirError(f"{out} holds no run (no config.json)")
    model, cfg, meta = load_run_model(out, step=step)
    device = torch.device(cfg.train.device if torch.cuda.is_available() else "cpu")
    model.to(device)
    corpus = corpus_for(cfg.data, progress=progress)
    tc = cfg.train
    val = evaluate(model, corpus.val, tc.batch_size, tc.seq_len, tc.eval_tokens, device)
    test = evaluate(model, corpus.test, tc.batch_size, tc.seq_len, tc.eval_tokens, device)
    return {"step": int(meta["step"]), "val_ppl": val["ppl"], "test_ppl": test["ppl"], "val_loss": val["loss"], "test_loss": test["loss"]}
