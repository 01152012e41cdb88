"""The lab with sparse attention: the ``attention`` preset (its variants, budgets and kept
fractions), ``model.attention`` as a variant field, ``compare --dry-run`` and the report's sparse
attention table (terminal and HTML)."""

from __future__ import annotations

import re

import pytest
from rich.console import Console

from sparseroute.attention import ATTENTION_ROUTERS
from sparseroute.cli import main
from sparseroute.lab import report
from sparseroute.lab.attention_summary import attention_rows
from sparseroute.lab.presets import ATTENTION_SEQ_LEN, SWEEP_PRESETS, sweep_preset
from sparseroute.lab.results import RunResult, SweepResults
from sparseroute.lab.prune_sweep import PruneSweepSpec
from sparseroute.lab.spec import VARIANT_FIELDS, load_spec
from sparseroute.models import flops_per_token
from sparseroute.models.flops import attention_densities, parameter_counts
from sparseroute.train.config import resolve_run

VARIANTS = ["dense", "window", "moba", "moba+conv", "nsa", "indexer", "kmeans"]


@pytest.mark.parametrize("name", sorted(SWEEP_PRESETS))
def test_every_variant_of_every_preset_resolves(name):
    """Fails naming the router while a preset refers to one that is not registered."""
    spec = sweep_preset(name)
    if isinstance(spec, PruneSweepSpec):  # a pruning sweep: its jobs and the LM it trains
        assert spec.jobs() and spec.lm_config().model.d_model > 0
        return
    for v in spec.variants:
        attention = v.overrides.get("model", {}).get("attention")
        if isinstance(attention, dict):
            assert attention["router"] in ATTENTION_ROUTERS, (name, v.name, ATTENTION_ROUTERS.names())
    plan = spec.plan()
    assert {p.variant for p in plan} == {v.name for v in spec.variants}


def test_attention_preset():
    spec = sweep_preset("attention")
    assert [v.name for v in spec.variants] == VARIANTS and spec.reference == "dense"
    assert spec.seeds == (0, 1, 2) and spec.relative_margin
    plan = spec.plan()
    assert len(plan) == 21
    budgets = {(p.config.train.tokens, p.config.train.batch_size, p.config.train.seq_len) for p in plan}
    assert len(budgets) == 1 and next(iter(budgets))[2] == ATTENTION_SEQ_LEN == 2048
    for p in plan:
        m = p.config.model
        assert m.max_seq_len == 2048 and m.moe is None and m.d_model == 256 and m.n_layers == 4  # tiny, dense FFN
        assert p.config.data.corpus == "stdlib" and p.config.data.tokenizer == "bpe"
        assert m.attention is not None and m.attention.block_size == 64 and m.attention.layers == "all"
    first = {p.variant: p.config.model for p in plan if p.config.train.seed == 0}
    assert first["dense"].attention.router == "dense"
    assert first["moba+conv"].attention.router_options == {"top_k": 3, "key_conv": 4}
    # every sparse variant keeps between 1/8 and about 1/4 of the causal score matrix at 2048
    for v, model in first.items():
        (rho, *_), = {tuple(attention_densities(model, 2048))}
        if v == "dense":
            assert rho == 1.0
        else:
            assert 1 / 8 <= rho <= 0.26, (v, rho)


def test_a_variant_may_set_model_attention_in_a_spec_file(tmp_path):
    assert "model.attention" in VARIANT_FIELDS
    path = tmp_path / "spec.toml"
    path.write_text("""
name = "attn"
seeds = [0]
[base.model]
depth = 2
[base.train]
tokens = "8k"
batch_size = 2
seq_len = 128
[[variants]]
name = "sdpa"
[[variants]]
name = "moba-top4"
model.attention = { router = "moba", router_options = { top_k = 4 }, block_size = 16 }
""")
    plan = load_spec(path).plan()
    assert plan[0].config.model.attention is None
    assert plan[1].config.model.attention.router_options == {"top_k": 4}


def test_dry_run_lists_the_seven_variants(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("COLUMNS", "200")
    store = tmp_path / "lab.sqlite"
    assert main(["compare", "--preset", "attention", "--dry-run", "--no-estimate", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "7 variants x 3 seeds = 21 runs" in out
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert [re.split(r"\s*│\s*", r)[1] for r in rows] == VARIANTS
    assert "moba 0.201" in out and "dense 1.000" in out
    assert not store.exists()


# ---------------------------------------------------------------- the report
SEQ = 128


def _config(attention: dict | None) -> dict:
    settings = {"model": {"depth": 2}, "train": {"tokens": "8k", "batch_size": 2, "seq_len": SEQ}}
    if attention is not None:
        settings["model"]["attention"] = attention
    return resolve_run(settings).to_dict()


# per variant: attention settings, test PPL per seed, eval-mode stats per layer (density, recall)
ATTN = {
    "dense": ({"router": "dense", "block_size": 16}, [5.0, 5.1, 4.9], [(1.0, 1.0), (1.0, 1.0)]),
    "moba": ({"router": "moba", "block_size": 16, "router_options": {"top_k": 1}}, [5.3, 5.2, 5.4],
             [(0.40, 0.80), (0.44, 0.60)]),
    "window": ({"router": "window", "block_size": 16}, [5.6, 5.5, 5.7], None),  # no profile: from the training log
}


def _run(i: int, variant: str, seed: int) -> RunResult:
    attention, ppls, layers = ATTN[variant]
    config = _config(attention)
    config["train"]["seed"] = seed
    model = resolve_run({"model": {"depth": 2, "attention": attention}, "train": {"seq_len": SEQ}}).model
    final = {
        "steps": 32, "tokens": 8192, "test_ppl": ppls[seed], "val_ppl": ppls[seed] + 0.1, "test_loss": 1.6,
        "val_loss": 1.6, "flops_per_token": flops_per_token(model, SEQ), "parameter_counts": parameter_counts(model),
        "train_seconds": 10.0, "active_experts_per_layer": None,
    }
    if layers is not None:
        final["attention_profile"] = [{"density": d, "recall": r, "mass": 0.9, "blocks_per_query": 2.0}
                                      for d, r in layers]
        final["step_seconds"] = 0.1 * (1 + (variant == "dense"))
    metrics = [{"step": s, "tokens": s * 256, "lr": 1e-3, "loss": 3.0, "aux_loss": 0.0,
                "attention": {"density": 0.30 + 0.02 * s, "recall": 0.5, "mass": 0.8, "blocks_per_query": 2.0}}
               for s in (10, 20)]
    return RunResult(run_id=i, variant=variant, seed=seed, status="done", config=config, final=final,
                     metrics=metrics, train_seconds=10.0)


def _results(variants) -> SweepResults:
    runs = [_run(i * 3 + s + 1, v, s) for i, v in enumerate(variants) for s in range(3)]
    spec = {"name": "attn", "seeds": [0, 1, 2], "margin": 0.05, "relative_margin": True, "reference": "dense",
            "base": {"model": {"depth": 2}}, "variants": [{"name": v} for v in variants]}
    return SweepResults(sweep_id=3, name="attn", spec=spec, variants=list(variants), runs=runs, reference="dense")


def test_report_shows_ppl_density_recall_and_time_per_step(tmp_path):
    results = _results(["dense", "moba", "window"])
    comparison = report.comparison_of(results, margin=0.05, relative=True)
    rows = {r.variant: r for r in attention_rows(results, comparison)}
    assert rows["moba"].stats["density"] == (pytest.approx(0.42), pytest.approx([0.40, 0.44]))
    assert rows["moba"].stats["recall"][0] == pytest.approx(0.70) and not rows["moba"].from_training
    assert rows["window"].from_training and rows["window"].stats["density"][0] == pytest.approx(0.60)  # (0.5 + 0.7) / 2
    assert rows["dense"].step_seconds == pytest.approx(0.2) and rows["moba"].step_seconds == pytest.approx(0.1)
    assert rows["window"].step_estimated and rows["window"].step_seconds == pytest.approx(10.0 / 32)
    assert rows["moba"].attention == "moba (top_k=1, bs 16)" and rows["moba"].layers == "all 2"
    assert rows["moba"].flops < rows["dense"].flops

    console = Console(record=True, width=250)
    report.print_summary(results, comparison, console=console)
    text = console.export_text()
    assert "Sparse attention" in text and "dense + moba attention" in text  # the summary's router column too
    line = next(ln for ln in text.splitlines() if ln.split()[:1] == ["moba"] and "top_k=1" in ln)
    for cell in ("5.30", "0.420", "0.700", "0.900", "0.100"):
        assert cell in line, (cell, line)
    window = next(ln for ln in text.splitlines() if ln.split()[:1] == ["window"] and "bs 16" in ln)
    assert "0.600 (train)" in window and "≈0.312" in window

    html = report.write_report(results, tmp_path / "r.html", margin=0.05, relative=True).read_text()
    assert '<section id="attention">' in html and 'id="attention-table"' in html
    section = html[html.index('<section id="attention">'):]
    section = section[:section.index("</section>")]
    assert "0.420" in section and "0.400 / 0.440" in section and "≈0.312" in section


def test_no_attention_table_without_sparse_attention(tmp_path):
    results = _results(["dense", "moba"])
    for r in results.runs:
        r.config["model"].pop("attention")
    assert attention_rows(results, None) is None
    console = Console(record=True, width=200)
    report.print_summary(results, report.comparison_of(results), console=console)
    assert "Sparse attention" not in console.export_text()
    html = report.write_report(results, tmp_path / "r.html").read_text()
    assert 'id="attention"' not in html
