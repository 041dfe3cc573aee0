#!/usr/bin/env python
"""TranSpa benchmark: coupled structured sparse training vs its uncoupled baseline, quality, size and speed.

    .venv/bin/python benchmarks/transpa.py                    # every suite, reusing stored runs
    .venv/bin/python benchmarks/transpa.py --suite scratch    # pre-training a small LLaMA from random init
    .venv/bin/python benchmarks/transpa.py --suite scratch-long   # the same with 3x the tokens (~2.3 epochs)
    .venv/bin/python benchmarks/transpa.py --suite smol       # SmolLM2-135M pruned to 80% / 70% while training
    .venv/bin/python benchmarks/transpa.py --suite speed      # prefill / decode speed of the saved 70% models
    .venv/bin/python benchmarks/transpa.py --suite encoder    # MiniLM on wiki-topics to 60% of its parameters
    .venv/bin/python benchmarks/transpa.py --docs-only        # rebuild the tables from stored runs
    .venv/bin/python benchmarks/transpa.py --fresh            # rerun stored runs too
    .venv/bin/python benchmarks/transpa.py --smoke            # every setting shrunk: an end-to-end check in minutes
    .venv/bin/python benchmarks/transpa.py --suite smol --run smol-transpa-70-free   # one run of a suite

scratch: a small LLaMA (hidden 256, 4 layers, SwiGLU FFN 768, 8 heads / 4 KV
heads, tied embeddings) with a byte-level BPE vocabulary of 8192 tokens trained
on the wiki train split (so the LM head does not dominate compute), trained
from random initialisation on the same tokens four times: dense; TranSpa to
60% of the block (non-embedding) parameters (free layout); structured-l1 to
the same target on the same rounds; and a dense model of TranSpa's final size
trained from scratch. Perplexity on held-out wiki windows during training.
scratch-long: the same four runs with 3x the steps (2.5M tokens, ~2.3 epochs
of the train split): at 200 steps every model is far from trained. Both suites
repeat TranSpa (L1 unit score), structured-l1 and both dense models with other
seeds (model init and batch order; 1-2 at 200 steps, 1-4 at 600): the tables
give each seed, the means and the targets on the means.

smol: the embedded SmolLM2-135M pruned to 70% and 80% of its parameters while
training on wiki (uniform and free layouts), TranSpa vs structured-l1 and the
tSVD ablation (truncated SVD of each coupled product);
perplexity on the 40 held-out windows of 512 tokens. The 70% TranSpa models
are saved for the speed suite. TranSpa at 70% uniform also runs with its
couples selected by magnitude instead of Fisher (the L1-only estimation
ablation, smol-transpa-magnitude-70-uniform). The 70% uniform pair is rerun on one shared
parameter line (--shrink-schedule linear; the *-linear runs).

speed: dense SmolLM2 vs the saved 70% uniform and free TranSpa models, prefill
and decode tokens/s interleaved in one process, and each model's peak memory
in its own process.

encoder: the embedded MiniLM-L6 fine-tuned on wiki-topics while pruned to 60%
of its parameters (free layout: BERT's uniform layout can only shrink FFNs,
which cannot reach 60%; K 0.6, see ENCODER_FRACTION), TranSpa vs
structured-l1, the losparse benchmark's settings (the pair also on the shared
line); its dense fine-tuning is read from benchmarks/work/losparse/.

Each run is its own process and stores its JSON under benchmarks/work/transpa/
(--smoke: benchmarks/work/transpa-smoke/, whose tables and plots go to its
docs/ subdirectory, never to docs/). The tables (docs/results.md, transpa
section), docs/results_transpa.json and the plots docs/transpa_*.png are built
from every stored run whose settings match the constants below.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common import ROOT, THREADS, WORK, run_child, write_results_section

SMOKE = False  # --smoke: every setting shrunk, everything under WORK / "transpa-smoke"
OUT = WORK / "transpa"
#: --probe KEY=VALUE: one look at a scratch run with a training setting changed (e.g. a longer warm-up); its JSON
#: goes under WORK / "transpa-probes" (--smoke: "transpa-smoke-probes") and never into the tables, which read only the suites' own settings
PROBE: dict = {}
PROBE_KEYS = ("lr", "warmup", "weight_decay")

# ---------------------------------------------------------------- settings
# Round schedule (all suites): TranSpa's default K = 30% of the couples and θ = 0.9 per round; the round
# length is chosen so that the estimated rounds (evenly spread unit masses) reach the target by reach_by of
# the steps, then training continues at the final size; K is raised only if even one-step rounds cannot.
ROUNDS = {"fraction": 0.3, "theta": 0.9, "reach_by": 0.6}
#: TranSpa's unit score (the library's default); a stored TranSpa run scored otherwise is stale
UNIT_SCORE = "activation"
#: the tSVD ablation's definition (runs under an earlier one, the θ rule on the singular values, are stale)
TSVD_UNIT_SCORE = "l1-count-svd-directions"

#: the scratch model; 8 heads of 32 dims, 2 query heads per KV group
SCRATCH_MODEL = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 8,
                 "num_key_value_heads": 4, "max_position_embeddings": 2048, "tie_word_embeddings": True}
# lr 3e-3 peak, 5% linear warm-up (the 600-step suite: 15%), cosine to 0; GPT-2's residual init (o_proj / down_proj scaled by 1/sqrt(2L)).
# Chosen on the dense runs: at 200 steps dense perplexity was 703.7 / 450.6 / 443.1 at lr 3e-4 / 1e-3 / 3e-3 with
# transformers' init, and 361.9 at 3e-3 with the scaled init (the small dense model: 697.5 / 423.8 / 400.3 / 318.4).
# Weight decay 0.1 as in LLaMA pre-training. Every run sees the same tokens (only the model differs).
# SCRATCH_STEPS: 200 steps x 16 x 256 = 819k tokens (0.76 epochs of the wiki train split). A step is about
# 35 MFLOP per token x 4096 tokens = 0.14 TFLOP. The smoke measured 8.6-9.5 s per dense step with the machine at
# a load of ~4-5 (our process got about half of the 2 cores), i.e. ~4.5-5 s idle: a dense run is ~16 min on an
# idle machine (~32 min at that load); TranSpa / structured-l1 add their rounds. The free layout (the paper's):
# in the uniform layout attention loses whole KV groups chosen by Fisher alone, the same for both scorers.
SCRATCH_STEPS = 200
# The rounds of TranSpa and structured-l1 follow one straight line from the start to the target at reach_by of the
# steps (--shrink-schedule linear): the same parameter trajectory, as a comparison of two scorers needs (on their
# own θ rules TranSpa reached the target at step 126 of 600, structured-l1 at 273). Rounds every 2 (6) steps keep
# the line's share of a round small (~21k parameters); a θ round on the small attention couples can still remove
# less: the 600-step runs stayed within 0.2-2.0% of the start parameters of the line, the 200-step runs (2 batches
# of Fisher per round) lagged it by up to 2.5-5.4% (the tables give each run's lag).
SCRATCH = {"model": SCRATCH_MODEL, "vocab": 8192, "steps": SCRATCH_STEPS, "batch_size": 16, "seq_len": 256,
           "lr": 3e-3, "init": "gpt2-scaled-residual", "weight_decay": 0.1, "warmup": 0.05,
           "eval_every": SCRATCH_STEPS // 10, "eval_windows": 100, "eval_batch_size": 10, "keep_blocks": 0.6,
           "layout": "free", **ROUNDS, "shrink_schedule": "linear", "round_steps": 2}
#: the same with 3x the steps: at 200 steps every model is far from trained
# A 15% warm-up (`sparseforge train --from-scratch`'s default): under 5% the full-size model's seeds spread from 115
# to 179 perplexity, every slow one after an early gradient spike (norm 10-15 before clipping, in the warm-up), which
# decided the verdicts more than the methods did; under 15% no run of the suite spikes (docs/transpa.md)
SCRATCH_LONG = {**SCRATCH, "steps": 3 * SCRATCH_STEPS, "eval_every": 3 * SCRATCH_STEPS // 10, "round_steps": 6,
                "warmup": 0.15}
SMOL = {"steps": 150, "batch_size": 4, "seq_len": 256, "lr": 1e-4, "weight_decay": 0.01, "warmup": 0.06,
        "eval_seq_len": 512, "eval_windows": 40, **ROUNDS}
SMOL_DENSE_PERPLEXITY = 14.10  # the one-shot tables' dense SmolLM2-135M on the same 40 x 512 windows
#: benchmarks/losparse.py's ENCODER settings (copied: its stored dense run is compared only if they match)
ENCODER_TRAIN = {"steps": 120, "batch_size": 16, "seq_len": 128, "lr": 5e-4, "weight_decay": 0.01, "warmup": 0.06}
# K 0.6 for the encoder: at TranSpa's 0.3 the rounds stall near 89% of the parameters (a 72-round probe): Fisher
# keeps selecting QK couples that are down to ~9 dims of similar mass, where the θ rule removes nothing, so VO and
# FFN couples are seldom selected; at 0.6 a probe reached 60% by round ~61 of 72. Both methods use the same K.
# Rounds every step: the estimate (32 rounds at K 0.6) is optimistic, the probe needed ~61.
ENCODER_FRACTION = 0.6
ENCODER = {**ENCODER_TRAIN, "target": 0.6, "layout": "free", **ROUNDS, "fraction": ENCODER_FRACTION, "round_steps": 1}
SPEED = {"prefill_tokens": 512, "decode_tokens": 64, "context": 512, "batch_size": 1, "repeats": 5, "warmup": 1}

#: --smoke: the scratch model and its tokens per step stay full size (its step time is what the full budget
#: is estimated from); everything else shrinks. θ 0.5 lets the targets be reached in a handful of rounds.
SMOKE_ROUNDS = {"theta": 0.5}
SMOKE_SETTINGS = {
    "scratch": {**SCRATCH, **SMOKE_ROUNDS, "steps": 6, "eval_every": 3, "eval_windows": 4, "eval_batch_size": 4},
    "scratch-long": {**SCRATCH, **SMOKE_ROUNDS, "steps": 8, "eval_every": 4, "eval_windows": 4, "eval_batch_size": 4},
    "smol": {**SMOL, **SMOKE_ROUNDS, "steps": 3, "batch_size": 1, "seq_len": 64, "eval_windows": 2},
    "encoder": {**ENCODER, **SMOKE_ROUNDS, "steps": 8, "batch_size": 4, "seq_len": 32},
    "speed": {**SPEED, "prefill_tokens": 32, "decode_tokens": 4, "context": 32, "repeats": 1, "warmup": 0},
}

TARGETS = {"scratch_dense_gap": 0.05, "speed_prefill": 1.4, "speed_decode": 1.2}
SUITES = ("scratch", "scratch-long", "smol", "speed", "encoder")
SCRATCH_SUITES = ("scratch", "scratch-long")
#: the TranSpa run the scratch targets are read from: `sparseforge train --from-scratch` scores units by the paper's
#: coupled L1 product (the activation score is the default on pretrained models)
SCRATCH_TRANSPA = "transpa-l1"
#: run methods that are a library method with options: (the method `train` runs, the options it adds); the workers
#: train them so and ``stored_run`` rejects a stored run trained otherwise
RUN_VARIANTS = {"small-dense": ("dense", {}), "transpa-l1": ("transpa", {"unit_score": "l1"}),
                "transpa-magnitude": ("transpa", {"couple_score": "magnitude"})}
#: the scratch suites repeat the runs the targets compare with these seeds too (model init and batch order; within
#: a seed every run sees the same tokens): one seed's gap of a few percent can be noise. (Under the 600-step suite's
#: earlier 5% warm-up, five seeds were needed to see that spiked seeds, not the methods, decided the verdicts.)
REPEAT_SEEDS = {"scratch": (1, 2), "scratch-long": (1, 2, 3)}
REPEATED = (SCRATCH_TRANSPA, "structured-l1", "small-dense", "dense")
LABELS = {"dense": "dense", "transpa": "TranSpa", "structured-l1": "structured-l1", "small-dense": "dense, final size",
          "transpa-l1": "TranSpa (L1 unit score)", "tsvd": "tSVD of the coupled products",
          "transpa-magnitude": "TranSpa, couples by magnitude (no Fisher)"}
#: parameters of the smallest removal per (suite, layout) (``finest_removal``: an FFN unit, or one in every layer),
#: for runs stored before the rounds stopped within half of it (their reports lack ``tolerance``)
FINEST_REMOVAL = {("smol", "uniform"): 30 * 3 * 576, ("smol", "free"): 3 * 576, ("encoder", "free"): 2 * 384 + 1,
                  ("scratch", "free"): 3 * 256, ("scratch-long", "free"): 3 * 256}


def settings(suite: str, probed: bool = True) -> dict:
    """The suite's settings; a --probe's changes included unless ``probed`` is False (what stored runs match)."""
    base = SMOKE_SETTINGS[suite] if SMOKE else settings_full(suite)
    return {**base, **PROBE} if probed and PROBE and suite in SCRATCH_SUITES else base


def settings_full(suite: str) -> dict:
    return {"scratch": SCRATCH, "scratch-long": SCRATCH_LONG, "smol": SMOL, "encoder": ENCODER, "speed": SPEED}[suite]


def use_smoke() -> None:
    global SMOKE, OUT
    SMOKE, OUT = True, WORK / "transpa-smoke"


def runs_home() -> Path:
    """Where the suite's runs (and the scratch tokenizer) are stored; a probe writes elsewhere."""
    return WORK / ("transpa-smoke" if SMOKE else "transpa")


def parse_probe(pairs: list[str]) -> dict:
    probe = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not sep or key not in PROBE_KEYS or number is None:
            raise SystemExit(f"--probe '{pair}': use KEY=NUMBER with KEY one of {', '.join(PROBE_KEYS)}, e.g. warmup=0.15")
        probe[key] = number
    return probe


def use_probe(probe: dict) -> None:
    global PROBE, OUT
    PROBE = probe
    OUT = runs_home().with_name(runs_home().name + "-probes") / "-".join(f"{k}{v:g}" for k, v in sorted(probe.items()))


def probe_args() -> list[str]:
    return [arg for k, v in PROBE.items() for arg in ("--probe", f"{k}={v!r}")]


def docs_dir() -> Path:
    return OUT / "docs" if SMOKE else ROOT / "docs"


@dataclass(frozen=True)
class Run:
    """One configuration, one child process, one JSON."""

    suite: str
    method: str  # dense | transpa | structured-l1 | small-dense (scratch: dense of TranSpa's final size)
    target: float | None = None  # fraction of all parameters (smol, encoder)
    layout: str = "uniform"
    seed: int = 0  # the model's initialisation and the batch order (the scratch suites repeat with REPEAT_SEEDS)
    schedule: str = "theta"  # smol / encoder: "linear" reruns a pair on one shared parameter line

    @property
    def name(self) -> str:
        parts = [self.suite, self.method]
        if self.target is not None:
            parts += [f"{round(100 * self.target)}", self.layout]
        if self.seed:
            parts.append(f"seed{self.seed}")
        if self.schedule != "theta":
            parts.append(self.schedule)
        return "-".join(parts)

    @property
    def path(self) -> Path:
        return OUT / f"{self.name}.json"

    @property
    def model_dir(self) -> Path:
        return OUT / f"{self.name}.model"


def planned(suite: str) -> list[Run]:
    """The runs of a suite, most important first."""
    if suite in SCRATCH_SUITES:
        return ([Run(suite, m) for m in ("dense", "transpa", "structured-l1", "small-dense", "transpa-l1")]
                + [Run(suite, m, seed=seed) for seed in REPEAT_SEEDS[suite] for m in REPEATED])
    # SmolLM2 and MiniLM run on each method's own θ rounds (the paper's), where TranSpa can reach the target earlier
    # than structured-l1 and recover longer at the final size; one pair of each is rerun on the scratch suites'
    # shared line (--shrink-schedule linear) to show how much of the gap that explains
    if suite == "smol":
        return ([Run("smol", m, t, layout) for t, layout in ((0.7, "uniform"), (0.8, "uniform"), (0.7, "free"))
                 for m in ("transpa", "structured-l1")] + [Run("smol", "transpa-l1", 0.7, "uniform")]
                + [Run("smol", "transpa-magnitude", 0.7, "uniform")]
                + [Run("smol", "tsvd", t, layout) for t, layout in ((0.7, "uniform"), (0.7, "free"), (0.8, "uniform"))]
                + [Run("smol", m, 0.7, "uniform", schedule="linear") for m in ("transpa", "structured-l1")])
    if suite == "encoder":
        return [Run("encoder", m, settings("encoder")["target"], "free", schedule=schedule)
                for schedule in ("theta", "linear") for m in ("transpa", "structured-l1")]
    return []


def saved_for_speed() -> list[Run]:
    """The smol models the speed suite measures (saved by their workers)."""
    return [Run("smol", "transpa", 0.7, layout) for layout in ("uniform", "free")]


# ---------------------------------------------------------------- helpers shared by the workers


def train_options(s: dict, seed: int = 0) -> dict:
    return dict(steps=s["steps"], batch_size=s["batch_size"], lr=s["lr"], weight_decay=s["weight_decay"],
                warmup=s["warmup"], seed=seed)


def library_method(run: Run) -> tuple[str, dict]:
    """The library method ``run`` trains with and the method options its variant adds (RUN_VARIANTS)."""
    return RUN_VARIANTS.get(run.method, (run.method, {}))


def with_schedule(s: dict, run: Run) -> dict:
    """The suite's settings with the run's shrink schedule (a line check's)."""
    return s if run.schedule == "theta" else {**s, "shrink_schedule": run.schedule}


def round_schedule(model, target_params: float, s: dict) -> dict:
    """TranSpa's options: the round length (and K if needed) that reach ``target_params`` by reach_by of the steps
    (a ``round_steps`` in the settings is taken as it is)."""
    from sparseforge.structured.method import block_parameters, count_parameters, estimated_rounds

    total, block = count_parameters(model), block_parameters(model)
    target_block = int(target_params * total) - (total - block)
    by = max(1, int(s["reach_by"] * s["steps"]))
    fraction = s["fraction"]
    needed = max(1, estimated_rounds(block, target_block, fraction, s["theta"]))
    if s.get("round_steps"):
        round_steps = s["round_steps"]
        needed_k = (1 - (target_block / block) ** (1 / max(1, by // round_steps))) / (1 - s["theta"])
        fraction = max(fraction, math.ceil(100 * needed_k) / 100)
    elif needed <= by:
        round_steps = by // needed
    else:  # one-step rounds and a larger K: (1 - K(1-θ))^by <= target_block / block
        round_steps = 1
        fraction = math.ceil(100 * (1 - (target_block / block) ** (1 / by)) / (1 - s["theta"])) / 100
    options = {"target_params": target_params, "round_steps": round_steps, "fraction": fraction, "theta": s["theta"]}
    if s.get("shrink_schedule", "theta") != "theta":  # the line from the start to the target at reach_by
        options.update(shrink_schedule=s["shrink_schedule"], reach_by=s["reach_by"])
    return options


def target_reached_at(method_report: dict) -> int | None:
    """The step of the round that reached the target (None if it was not reached)."""
    if not method_report.get("reached_target"):
        return None
    return method_report["trajectory"][-1]["step"]


def save_trained(model, tokenizer, path: Path, layout: str, metadata: dict) -> None:
    """As ``sparseforge train`` saves: uniform = a plain HF checkpoint, free = the structure manifest too."""
    from sparseforge import save

    if layout == "free":
        from sparseforge.models.modules import structure_manifest
        from sparseforge.structured import manifest_includes

        metadata = {**metadata, "structure": structure_manifest(model, include=manifest_includes(model))}
    save(model, tokenizer, path, metadata=metadata, overwrite=True)


def file_fingerprint(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else None


# ---------------------------------------------------------------- scratch: tokenizer and models


def tokenizer_dir() -> Path:
    return runs_home() / f"tokenizer-{settings('scratch')['vocab']}"


def wiki_tokenizer():
    """A byte-level BPE tokenizer trained on the wiki train split (deterministic), cached in ``tokenizer_dir()``."""
    from transformers import PreTrainedTokenizerFast

    directory = tokenizer_dir()
    if not (directory / "tokenizer.json").exists():
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        from sparseforge.data import wiki_documents

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=settings("scratch")["vocab"], show_progress=False,
                                      special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(wiki_documents("train"), trainer=trainer)
        wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                          unk_token="<unk>")
        tmp = directory.with_name(directory.name + ".tmp")
        wrapped.save_pretrained(tmp)
        tmp.rename(directory)
    return PreTrainedTokenizerFast.from_pretrained(directory)


def llama_block_parameters(fields: dict) -> int:
    """Block parameters of a bias-free LLaMA config (attention, SwiGLU FFN, two RMSNorms per block)."""
    hidden, heads, kv = fields["hidden_size"], fields["num_attention_heads"], fields["num_key_value_heads"]
    head_dim = fields.get("head_dim") or hidden // heads
    attention = hidden * head_dim * (2 * heads + 2 * kv)
    return fields["num_hidden_layers"] * (attention + 3 * hidden * fields["intermediate_size"] + 2 * hidden)


def small_dense_fields(base: dict, transpa: dict | None, keep_blocks: float) -> tuple[dict, dict]:
    """A uniform LLaMA config whose block parameters match TranSpa's final count (its stored report if any, else
    the target): the number of whole KV groups (head size kept) whose attention parameters come closest to
    TranSpa's final attention (else keep x the groups), then the FFN width that fills the rest."""
    hidden, layers = base["hidden_size"], base["num_hidden_layers"]
    group_size = base["num_attention_heads"] // base["num_key_value_heads"]
    head_dim = hidden // base["num_attention_heads"]

    def attention(groups: int) -> int:  # one layer's q, k, v, o
        return hidden * head_dim * (2 * groups * group_size + 2 * groups)

    if transpa is not None:
        report = transpa["method_report"]
        wanted = report["final_parameters"]["blocks"]
        ffn = sum(3 * hidden * layer["ffn"] + 2 * hidden for layer in report["layers"])
        per_layer = (wanted - ffn) / layers
        groups = min(range(1, base["num_key_value_heads"] + 1), key=lambda g: abs(attention(g) - per_layer))
        source = "TranSpa's final report"
    else:
        wanted = round(keep_blocks * llama_block_parameters(base))
        groups = max(1, round(keep_blocks * base["num_key_value_heads"]))
        source = "the target"
    fields = dict(base, num_attention_heads=groups * group_size, num_key_value_heads=groups, head_dim=head_dim)
    fields["intermediate_size"] = max(1, round((wanted / layers - attention(groups) - 2 * hidden) / (3 * hidden)))
    return fields, {"matched_to": source, "wanted_blocks": wanted, "blocks": llama_block_parameters(fields)}


def scratch_model(fields: dict, tokenizer, scaled_init: bool = True, seed: int = 0):
    """A random LLaMA drawn from ``seed``; ``scaled_init``: GPT-2's residual scaling, as `sparseforge train --from-scratch` does
    (benchmarks/scratch_sizes.py compares both)."""
    from transformers import LlamaConfig

    from sparseforge.models.init import random_llama

    fields = dict(fields, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    heads, kv_heads = fields["num_attention_heads"], fields["num_key_value_heads"]
    fields.setdefault("head_dim", fields["hidden_size"] // heads)
    # transformers 5 refuses hidden_size % num_attention_heads != 0 even with an explicit head_dim, which is
    # the shape TranSpa's uniform layout leaves (e.g. 6 heads of 32 in 256): the heads are set after validation
    config = LlamaConfig(**dict(fields, num_attention_heads=1, num_key_value_heads=1))
    config.num_attention_heads, config.num_key_value_heads = heads, kv_heads
    return random_llama(config, seed, scaled_residual=scaled_init)


def stored_transpa_scratch(suite: str) -> dict | None:
    return stored_run(Run(suite, "transpa"))


# ---------------------------------------------------------------- one run (child process)


def scratch_worker(run: Run) -> dict:
    from sparseforge.structured.method import block_parameters, count_parameters
    from sparseforge.training import train

    s = settings(run.suite)
    tokenizer = wiki_tokenizer()
    extra = {"tokenizer": {"dir": str(tokenizer_dir().relative_to(ROOT)), "vocab": len(tokenizer),
                           "fingerprint": file_fingerprint(tokenizer_dir() / "tokenizer.json")}}
    fields = dict(s["model"])
    if run.method == "small-dense":
        fields, extra["small_dense"] = small_dense_fields(fields, stored_transpa_scratch(run.suite), s["keep_blocks"])
    model = scratch_model(fields, tokenizer, seed=run.seed)
    extra["block_parameters_start"] = block_parameters(model)
    method, variant = library_method(run)
    options = {}
    if method != "dense":
        total, block = count_parameters(model), block_parameters(model)
        target = (total - block + s["keep_blocks"] * block) / total  # keep_blocks of the blocks, as a share of all
        options = {**round_schedule(model, target, s), "layout": s["layout"], **variant}
    report = train(model, tokenizer, method=method, task="lm", data="wiki", seq_len=s["seq_len"],
                   eval_windows=s["eval_windows"], eval_batch_size=s["eval_batch_size"], method_options=options,
                   progress=False, eval_every=s["eval_every"], **train_options(s, run.seed))
    extra.update(model_fields=fields, method_options=options, seed=run.seed)
    return {**report.to_dict(), **extra}


def smol_worker(run: Run) -> dict:
    from sparseforge import evaluate, load_model
    from sparseforge.training import train

    s = settings("smol")
    model, tokenizer = load_model(None)
    method, variant = library_method(run)  # the ablations of the unit score and of the couple selection
    options = {**round_schedule(model, run.target, with_schedule(s, run)), "layout": run.layout, **variant}
    # no evaluation during training: the reported perplexity is the one-shot tables' protocol, after training
    report = train(model, tokenizer, method=method, task="lm", data="wiki", seq_len=s["seq_len"], evaluate=False,
                   method_options=options, progress=False, **train_options(s))
    report.run["metrics_after_512"] = evaluate(model, tokenizer, data="wiki", seq_len=s["eval_seq_len"],
                                               max_windows=s["eval_windows"], progress=False)
    result = {**report.to_dict(), "method_options": options}
    if run in saved_for_speed():
        save_trained(model, tokenizer, run.model_dir, run.layout, {"train": result})
    return result


def encoder_worker(run: Run) -> dict:
    import torch

    from sparseforge import load_model
    from sparseforge.train.labelled import classification_splits
    from sparseforge.training import train

    s = settings("encoder")
    splits = classification_splits("wiki-topics")
    torch.manual_seed(0)
    model, tokenizer = load_model("encoder", task="classify", label_names=splits[2].names)
    options = {**round_schedule(model, run.target, with_schedule(s, run)), "layout": run.layout}
    # no evaluation before training: the new head scores chance
    report = train(model, tokenizer, method=run.method, task="classify", data=splits, seq_len=s["seq_len"],
                   method_options=options, progress=False, evaluate_before=False, **train_options(s))
    return {**report.to_dict(), "method_options": options}


WORKERS = {"scratch": scratch_worker, "scratch-long": scratch_worker, "smol": smol_worker, "encoder": encoder_worker}


def worker(name: str) -> None:
    import logging

    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(THREADS)
    run = next(r for suite in SUITES for r in planned(suite) if r.name == name)
    started = time.perf_counter()
    result = WORKERS[run.suite](run)
    from sparseforge.hardware import cpu_features

    result.update(name=run.name, suite=run.suite, target=run.target, layout=run.layout, settings=settings(run.suite),
                  smoke=SMOKE, total_seconds=round(time.perf_counter() - started, 1), machine=cpu_features())
    run.path.write_text(json.dumps(result, indent=1, default=str))


def speed_sources() -> dict:
    """What the speed result depends on: the saved models' training runs (their JSON's fingerprints)."""
    return {r.name: file_fingerprint(r.path) for r in saved_for_speed()}


def speed_worker() -> None:
    import logging

    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(THREADS)
    from sparseforge import load_model
    from sparseforge.eval.speed import SpeedConfig, benchmark_speed, format_speed_table, measure_peak_memory

    config = SpeedConfig(**settings("speed"), threads=THREADS)
    sources = [("dense SmolLM2-135M", None)] + [(f"TranSpa 70% {r.layout}", r.model_dir) for r in saved_for_speed()]
    models = [(label, load_model(source)[0]) for label, source in sources]
    result = benchmark_speed(models, config, progress=False)
    del models
    for entry, (_, source) in zip(result["models"], sources):
        entry["memory"] = measure_peak_memory(source, config)
        entry["peak_rss_mb"] = entry["memory"]["peak_rss_mb"]
        entry["source"] = "embedded" if source is None else str(Path(source).relative_to(ROOT))
    print(format_speed_table(result))
    print(f"CPU {result['machine']['model_name']}; flags: {', '.join(result['machine']['flags'])}")
    result.update(settings=settings("speed"), sources=speed_sources(), smoke=SMOKE)
    (OUT / "speed.json").write_text(json.dumps(result, indent=1, default=str))


# ---------------------------------------------------------------- stored runs


def unit_score(result: dict) -> str:
    """How a stored TranSpa run scored units (runs from before the choice existed used the coupled L1 product)."""
    return result.get("method_report", {}).get("config", {}).get("unit_score") or "l1"


def kept_results() -> dict:
    """docs/results_transpa.json ({} if absent, and under --smoke): benchmarks/work/ is not kept from one machine
    to the next, the docs are."""
    path = ROOT / "docs" / "results_transpa.json"
    return {} if SMOKE or not path.exists() else json.loads(path.read_text())


def kept_in_docs(run: Run) -> dict | None:
    """``run`` as the docs keep it (final numbers, every 10th step)."""
    result = kept_results().get(run.suite, {}).get("runs", {}).get(run.name)
    if result is not None:
        result["run"]["history_every"] = 10
    return result


def ended_by_an_older_clamp(run: Run, result: dict) -> bool:
    """A run stored before the rounds stopped within half a removal of the target, that would have ended
    elsewhere by more than 0.1% of the parameters: it undershot the target by more than half the finest removal
    (a crossing removal the current rule skips; within half of it the rule takes the same one) and by more than
    0.1%. (smol-transpa-l1-70-uniform ended 46k parameters, 0.03%, below: one FFN slice more than the current
    rule removes; smol-transpa-70-uniform 6.0M, 4.4%, below: a whole KV-group step.)"""
    report = result.get("method_report", {})
    if "final_parameters" not in report or "tolerance" in report.get("parameters", {}):
        return False
    below = report["parameters"]["target"] - report["final_parameters"]["total"]
    finest = FINEST_REMOVAL[(run.suite, report.get("layout", run.layout))]
    return below > finest / 2 and below > 1e-3 * report["parameters"]["start"]


def stored_run(run: Run) -> dict | None:
    """The stored result of ``run`` if its settings (and what it was derived from) are still the current ones:
    its JSON under benchmarks/work/, else the copy the docs keep."""
    in_work = run.path.exists()
    result = json.loads(run.path.read_text()) if in_work else kept_in_docs(run)
    if result is None:
        return None
    method, variant = library_method(run)
    if method == "transpa" and unit_score(result) != variant.get("unit_score", UNIT_SCORE):
        return None
    couple_score = result.get("method_report", {}).get("config", {}).get("couple_score", "fisher")
    if couple_score != variant.get("couple_score", "fisher"):
        return None
    if run.method == "tsvd" and unit_score(result) != TSVD_UNIT_SCORE:  # an earlier definition of the ablation
        return None
    if result.get("settings") != settings(run.suite, probed=False) or ended_by_an_older_clamp(run, result):
        return None
    if run.suite in SCRATCH_SUITES:
        tokenizer = file_fingerprint(tokenizer_dir() / "tokenizer.json")
        if tokenizer and result["tokenizer"]["fingerprint"] != tokenizer:
            return None
        if run.method == "small-dense":  # sized after TranSpa's final count: stale if that run changed
            transpa = stored_transpa_scratch(run.suite)
            made_from = result["small_dense"]["matched_to"] == "TranSpa's final report"
            if transpa and (not made_from or result["small_dense"]["wanted_blocks"]
                            != transpa["method_report"]["final_parameters"]["blocks"]):
                return None
    if run.suite == "smol" and run in saved_for_speed() and in_work and not run.model_dir.exists():
        return None
    return result


def stored(suite: str) -> dict[Run, dict]:
    return {run: result for run in planned(suite) if (result := stored_run(run)) is not None}


def stored_speed() -> dict | None:
    """The speed result if its settings and the models it measured are current: its JSON under benchmarks/work/,
    else (no such file: benchmarks/work/ is not kept from one machine to the next) the copy the docs keep."""
    path = OUT / "speed.json"
    if not path.exists():
        result = kept_results().get("speed", {}).get("result")
        return result if result is not None and result.get("settings") == settings("speed") else None
    result = json.loads(path.read_text())
    if result.get("settings") != settings("speed") or result.get("sources") != speed_sources():
        return None
    return result


def stored_encoder_dense() -> tuple[dict | None, str]:
    """benchmarks/losparse.py's dense MiniLM fine-tuning, if its settings are ours (its JSON, else the docs' copy)."""
    path = WORK / "losparse" / "encoder-dense.json"
    mine = {k: settings("encoder")[k] for k in ENCODER_TRAIN}
    if not path.exists():
        kept = ROOT / "docs" / "results_losparse.json"
        result = json.loads(kept.read_text()).get("encoder", {}).get("runs", {}).get("encoder-dense") if kept.exists() else None
        if result is not None and result.get("settings") == mine:
            return result, f"Dense fine-tuning: {kept.relative_to(ROOT)} (benchmarks/losparse.py, same settings)"
        return None, f"Dense fine-tuning: none stored ({path.relative_to(ROOT)}); run benchmarks/losparse.py --suite encoder"
    result = json.loads(path.read_text())
    if result.get("settings") != mine:
        differ = ", ".join(f"{k} {result.get('settings', {}).get(k)} vs {v}" for k, v in mine.items()
                           if result.get("settings", {}).get(k) != v)
        return None, f"Dense fine-tuning: not shown, the stored run ({path.relative_to(ROOT)}) has other settings ({differ})"
    return result, f"Dense fine-tuning: {path.relative_to(ROOT)} (benchmarks/losparse.py, same settings)"


# ---------------------------------------------------------------- tables


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _machine(result: dict) -> str:
    """The CPU a run's times were measured on and its bf16 vector features (runs from before it was recorded:
    "earlier session")."""
    m = result.get("machine")
    if not m:
        return "earlier session"
    bf16 = [name for flag, name in (("avx512_bf16", "AVX-512 BF16"), ("amx_bf16", "AMX")) if flag in m["flags"]]
    return m["model_name"] + ", " + (" + ".join(bf16) if bf16 else "no native bf16")


def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def _reached(result: dict) -> str:
    report = result["method_report"]
    if "reached_target" not in report:
        return "-"
    step = target_reached_at(report)
    return f"step {step}" if step is not None else "NO"


def _size_caveat(a: dict, b: dict) -> str:
    """A note when a compared pair did not end at the same size (a target not reached)."""
    sizes = [r["size_after"]["parameters"] for r in (a, b)]
    if abs(sizes[0] - sizes[1]) <= 0.01 * max(sizes):
        return ""
    reached = all(r["method_report"].get("reached_target", True) for r in (a, b))
    why = "the uniform layout removes whole groups / slices" if reached else "a target was not reached"
    return f" (NOT at equal size: {_params(sizes[0])} vs {_params(sizes[1])}; {why})"


def _every(steps: int) -> str:
    return "every step" if steps == 1 else f"every {steps} steps"


def _schedule_text(options: dict) -> str:
    text = f"a round {_every(options['round_steps'])}, K {options['fraction']:.2f}, θ {options['theta']:g}"
    if options.get("shrink_schedule") == "linear":
        text += (", each round capped by a straight line from the start to the target at "
                 f"{options['reach_by']:.0%} of the steps (the same parameter trajectory for both)")
    return text


def scratch_curve(result: dict) -> list[tuple[int, float]]:
    run = result["run"]
    points = [(0, run["metrics_before"]["perplexity"])] if run["metrics_before"] else []
    points += [(e["step"], e["perplexity"]) for e in run["evaluations"]]
    points.append((run["train_config"]["steps"], run["metrics_after"]["perplexity"]))
    return points


def seed_zero(runs: dict[Run, dict]) -> dict[Run, dict]:
    """The runs of the first seed: the curves, the main table and the plots."""
    return {run: result for run, result in runs.items() if run.seed == 0}


def geometric_mean(values: list[float]) -> float:
    """exp of the mean log: for perplexities, the perplexity of the mean NLL (one bad seed does not swamp it)."""
    return math.exp(sum(math.log(v) for v in values) / len(values))


#: two-sided 95% quantiles of Student's t by degrees of freedom (for the paired seed intervals)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def paired_interval(ratios: list[float]) -> tuple[float, float] | None:
    """95% t-interval of the mean per-seed log ratio, as relative gaps (lo, hi); None below 3 seeds. The geometric
    means' gap is exp(mean log ratio) - 1, so an interval that holds 0 says the seeds cannot tell the two apart."""
    n = len(ratios)
    if n < 3 or n - 1 not in T_975:
        return None
    logs = [math.log(r) for r in ratios]
    mean = sum(logs) / n
    half = T_975[n - 1] * math.sqrt(sum((x - mean) ** 2 for x in logs) / (n - 1) / n)
    return math.exp(mean - half) - 1, math.exp(mean + half) - 1


#: the share of the steps read for early gradient spikes, and the gradient norm counted as one (the clip is 1.0,
#: a smooth start peaks near 3 at step 1)
EARLY_SHARE, SPIKE_NORM = 0.1, 10.0


def early_grad_peak(result: dict) -> tuple[float, int, bool]:
    """The largest gradient norm (before clipping) in the first EARLY_SHARE of the steps, its step, and whether
    every step was read (the docs keep every 10th step's record and, since this check, the peak of all steps)."""
    run = result["run"]
    if "early_grad_peak" in run:
        return (*run["early_grad_peak"], True)
    steps = run["train_config"]["steps"]
    early = [h for h in run["history"] if h["step"] <= EARLY_SHARE * steps and "grad_norm" in h]
    peak = max(early, key=lambda h: h["grad_norm"], default=None)
    every_step = not run.get("history_every")
    return (peak["grad_norm"], peak["step"], every_step) if peak else (float("nan"), 0, every_step)


def seeds_table(runs: dict[Run, dict]) -> tuple[str, dict]:
    """The repeated runs' final perplexity per seed, their geometric means and the targets on them: TranSpa's below
    the other's (the mean per-seed log ratio below 0), and on how many seeds (a pair counts on the seeds both have)."""
    seeds = sorted({run.seed for run in runs})
    ppl = {(r.method, r.seed): res["run"]["metrics_after"]["perplexity"] for r, res in runs.items()}
    methods = [m for m in REPEATED if any((m, seed) in ppl for seed in seeds)]
    if len(seeds) < 2 or SCRATCH_TRANSPA not in methods:
        return "", {}
    lines = ["| run | " + " | ".join(f"seed {seed}" for seed in seeds) + " | geometric mean | range |",
             "|---|" + "---:|" * (len(seeds) + 2)]
    for method in methods:
        values = [ppl[(method, seed)] for seed in seeds if (method, seed) in ppl]
        cells = [f"{ppl[(method, seed)]:.2f}" if (method, seed) in ppl else "-" for seed in seeds]
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + f" | {geometric_mean(values):.2f} | "
                     f"{min(values):.2f}-{max(values):.2f} |")
    verdict, notes, tp = {"seeds": seeds}, [], SCRATCH_TRANSPA
    for other, label in (("structured-l1", "structured-l1"), ("small-dense", "the small dense model"),
                         ("dense", "dense")):
        shared = [seed for seed in seeds if (tp, seed) in ppl and (other, seed) in ppl]
        if len(shared) < 2:
            continue
        mine = geometric_mean([ppl[(tp, seed)] for seed in shared])
        theirs = geometric_mean([ppl[(other, seed)] for seed in shared])
        gaps = [ppl[(tp, seed)] / ppl[(other, seed)] - 1 for seed in shared]
        wins = sum(gap < 0 for gap in gaps)
        which = "seeds " + ", ".join(map(str, shared))
        interval = paired_interval([1 + gap for gap in gaps])
        spread = ""
        if interval is not None:
            verdict[f"transpa_vs_{other}_interval95"] = [round(interval[0], 4), round(interval[1], 4)]
            spread = f"; 95% interval of the paired gap {interval[0]:+.1%} to {interval[1]:+.1%}"
            if other != "dense":
                spread += (": the seeds cannot tell them apart" if interval[0] < 0 < interval[1]
                           else ": lower on the seeds' evidence" if interval[1] < 0 else ": higher on the seeds' evidence")
        if other == "dense":
            ok = mine / theirs - 1 <= TARGETS["scratch_dense_gap"]
            verdict["transpa_within_5pct_of_dense"] = ok
            notes.append(f"within {TARGETS['scratch_dense_gap']:.0%} of dense: {mine:.2f} vs {theirs:.2f} "
                         f"({mine / theirs - 1:+.1%}; {which}{spread}): {_verdict(ok)}")
            continue
        ok = mine < theirs
        verdict[f"transpa_below_{other}"] = ok
        verdict[f"transpa_below_{other}_seeds"] = f"{wins} of {len(shared)}"
        notes.append(f"below {label}: {mine:.2f} vs {theirs:.2f} ({mine / theirs - 1:+.1%}; {which}; lower on "
                     f"{wins} of {len(shared)}, per seed " + ", ".join(f"{gap:+.1%}" for gap in gaps) + f"{spread}): "
                     f"{_verdict(ok)}")
    peaks = {(r.method, r.seed): early_grad_peak(res) for r, res in runs.items()}
    sampled = sorted({f"{LABELS[r.method]} seed {r.seed}" for r in runs if not peaks[(r.method, r.seed)][2]})
    spiked = [(m, seed) for seed in seeds for m in methods if (m, seed) in peaks and peaks[(m, seed)][0] > SPIKE_NORM]
    spikes = [f"{LABELS[m]} seed {seed} ({peaks[(m, seed)][0]:.1f} at step {peaks[(m, seed)][1]}, perplexity "
              f"{ppl[(m, seed)]:.2f})" for m, seed in spiked]
    verdict["early_spikes"] = {f"{m}-seed{seed}": round(peaks[(m, seed)][0], 2) for m, seed in spiked}
    text = ("Repeated with other seeds (each seed draws the model's initialisation and the batch order; within a seed "
            "every run sees the same tokens; the small dense model keeps seed 0's shape). Final perplexity:\n\n"
            + "\n".join(lines))
    text += (f"\n\nGradient spikes early in training (a logged gradient norm above {SPIKE_NORM:g} in the first "
             f"{EARLY_SHARE:.0%} of the steps, before clipping to 1): "
             + ("; ".join(spikes) if spikes else "none") + "."
             + (f" Kept only every 10th step (a spike between them is not seen): {', '.join(sampled)}." if sampled else ""))
    if notes:
        text += f"\n\nTargets for {LABELS[tp]} on the geometric means over the seeds: " + "; ".join(notes) + "."
    return text, verdict


def scratch_table(runs: dict[Run, dict]) -> tuple[str, dict]:
    seeds_text, seeds_verdict = seeds_table(runs)
    runs = seed_zero(runs)
    s = settings(next(iter(runs)).suite)
    m = s["model"]
    tokens = s["steps"] * s["batch_size"] * s["seq_len"]
    any_run = next(iter(runs.values()))
    train_tokens = any_run["run"]["data"]["rows"] * s["seq_len"]
    pruned = next((r for r in runs.values() if r.get("method_options")), None)
    schedule = _schedule_text(pruned["method_options"]) if pruned else "see the runs"
    lines = [
        f"LLaMA from random initialisation (seed 0, GPT-2's residual init: o_proj and down_proj scaled by "
        f"1/sqrt(2 x layers)): hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, SwiGLU FFN "
        f"{m['intermediate_size']}, {m['num_attention_heads']} heads / {m['num_key_value_heads']} KV heads, tied embeddings; "
        f"vocabulary: a byte-level BPE of {s['vocab']} tokens trained on the wiki train split with `tokenizers` "
        f"(deterministic, cached in {tokenizer_dir().relative_to(ROOT)}). Budget per run: {s['steps']} steps x "
        f"{s['batch_size']} x {s['seq_len']} tokens = {tokens:,} tokens ({tokens / train_tokens:.2f} epochs of the "
        f"{train_tokens:,}-token wiki train split), the same for every run; lr {s['lr']:g} (cosine, "
        f"{s['warmup']:.0%} warm-up), weight decay {s['weight_decay']:g}, float32, {THREADS} threads. "
        f"TranSpa and structured-l1: target {s['keep_blocks']:.0%} of the block parameters ({s['layout']} layout), "
        f"{schedule}" + ("" if s.get("shrink_schedule") == "linear" else
                         f", planned to reach it by {s['reach_by']:.0%} of the steps") + ". The small dense model (a plain LLaMA "
        f"config) has the whole KV groups closest to TranSpa's final attention and the FFN width that matches its "
        f"block parameters. Perplexity on the first "
        f"{s['eval_windows']} held-out wiki windows of {s['seq_len']} tokens, every {s['eval_every']} steps.",
        "", "| run | block parameters | all parameters | perplexity | vs dense | target reached | train min | "
            "median step s | peak RSS MiB | CPU of the times |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    ppl = {r.method: res["run"]["metrics_after"]["perplexity"] for r, res in runs.items()}
    by_method = {r.method: res for r, res in runs.items()}
    for run, result in runs.items():
        blocks = result["method_report"].get("final_parameters", {}).get("blocks") \
            or llama_block_parameters(result["model_fields"])
        gap = f"{ppl[run.method] / ppl['dense'] - 1:+.1%}" if "dense" in ppl and run.method != "dense" else "-"
        lines.append(f"| {LABELS[run.method]} | {_params(blocks)} | {_params(result['size_after']['parameters'])} | "
                     f"{ppl[run.method]:.2f} | {gap} | {_reached(result)} | {result['run']['train_seconds'] / 60:.1f} | "
                     f"{result['run']['median_step_seconds']:.2f} | {result['run']['peak_rss_mb']:.0f} | "
                     f"{_machine(result)} |")
    verdict, notes = {}, []
    # the targets are TranSpa's as `sparseforge train --from-scratch` runs it (SCRATCH_TRANSPA: the paper's L1 unit
    # score); the other unit score is compared beside them
    tp = SCRATCH_TRANSPA if SCRATCH_TRANSPA in ppl else "transpa"
    if tp in ppl:
        verdict["targets_for"] = LABELS[tp]
        for other, label in (("structured-l1", "structured-l1"), ("small-dense", "the small dense model")):
            if other in ppl:
                verdict[f"transpa_below_{other}"] = ppl[tp] < ppl[other]
                notes.append(f"{LABELS[tp]} {ppl[tp]:.2f} < {label} {ppl[other]:.2f}: "
                             f"{_verdict(verdict[f'transpa_below_{other}'])}"
                             + _size_caveat(by_method[tp], by_method[other]))
        if "dense" in ppl:
            gap = ppl[tp] / ppl["dense"] - 1
            verdict["transpa_within_5pct_of_dense"] = gap <= TARGETS["scratch_dense_gap"]
            notes.append(f"{LABELS[tp]} within {TARGETS['scratch_dense_gap']:.0%} of dense ({ppl[tp]:.2f} vs "
                         f"{ppl['dense']:.2f}, {gap:+.1%}): {_verdict(verdict['transpa_within_5pct_of_dense'])}")
    lags = {LABELS[r.method]: res["method_report"]["schedule"]["max_lag"] for r, res in runs.items()
            if "max_lag" in res.get("method_report", {}).get("schedule", {})}
    if lags:
        start = next(res["method_report"]["parameters"]["start"] for r, res in runs.items() if LABELS[r.method] in lags)
        lines += ["", "Largest lag behind the line at a round (parameters above it, beyond half the finest removal): "
                  + "; ".join(f"{label} {lag:,} ({lag / start:.1%} of the start)" for label, lag in lags.items()) + "."]
    if notes:
        whose = " (TranSpa as `--from-scratch` runs it, the paper's L1 unit score)" if tp == "transpa-l1" else ""
        whose += ", seed 0" if seeds_text else ""
        lines += ["", f"Targets{whose}: " + "; ".join(notes) + "."]
    beside = "transpa" if tp == "transpa-l1" else "transpa-l1"
    if beside in ppl:
        compared = [f"{LABELS[o]} {ppl[o]:.2f}: {'below' if ppl[beside] < ppl[o] else 'NOT below'}"
                    for o in ("structured-l1", "small-dense", tp) if o in ppl]
        lines += ["", f"{LABELS[beside]} ({ppl[beside]:.2f}) against " + "; ".join(compared) + "."]
    if seeds_text:
        lines += ["", seeds_text]
        verdict["over_seeds"] = seeds_verdict
    return "\n".join(lines), verdict


def on_own_rounds(runs: dict[Run, dict]) -> dict[Run, dict]:
    """The runs on each method's own θ rounds (the main tables), without the line checks."""
    return {run: result for run, result in runs.items() if run.schedule == "theta"}


def line_check(runs: dict[Run, dict], score, label: str, lower_is_better: bool) -> tuple[str, dict]:
    """TranSpa vs structured-l1 on one shared line (the ``schedule="linear"`` runs of ``planned``) beside the same
    pair on their own θ rounds: the score, the step each reached the target and its lag (and a caveat when the pair
    did not end at the same size); ``score(result)`` is the suite's metric."""
    pairs = {}
    for run, result in runs.items():
        if run.method in ("transpa", "structured-l1"):
            pairs.setdefault((run.target, run.layout), {})[(run.schedule, run.method)] = result
    lines, verdict = [], {}
    for (target, layout), found in pairs.items():
        line = {m: found.get(("linear", m)) for m in ("transpa", "structured-l1")}
        if None in line.values():
            continue
        lines.append(f"| {target:.0%} {layout} | schedule | {LABELS['transpa']} | structured-l1 | TranSpa better |")
        lines.append("|---|---|---:|---:|---|")
        for schedule in ("theta", "linear"):
            pair = [found.get((schedule, m)) for m in ("transpa", "structured-l1")]
            if None in pair:
                continue
            values = [score(r) for r in pair]
            caveat = _size_caveat(*pair)  # a pair that ended at different sizes is not compared
            better = None if caveat else values[0] < values[1] if lower_is_better else values[0] > values[1]
            where = "target reached at " + " / ".join(_reached(r) for r in pair)
            if schedule == "linear":
                lags = [r["method_report"]["schedule"]["max_lag"] / r["method_report"]["parameters"]["start"]
                        for r in pair]
                where += "; largest lag " + " / ".join(f"{lag:.1%}" for lag in lags)
                verdict[f"transpa_better_on_line_{round(100 * target)}_{layout}"] = better
            name = "own θ rounds" if schedule == "theta" else "one shared line"
            answer = {True: "yes", False: "NO", None: "not compared" + caveat}[better]
            lines.append(f"| | {name} ({where}) | {values[0]:.4g} | {values[1]:.4g} | {answer} |")
    if not lines:
        return "", {}
    return ("The same pair on one shared parameter line (`--shrink-schedule linear`: every round capped by a straight "
            "line from the start to the target at "
            f"{ROUNDS['reach_by']:.0%} of the steps, as the scratch suites run), beside their own θ rounds, where "
            f"TranSpa can reach the target earlier and recover longer at the final size ({label}):\n\n"
            + "\n".join(lines)), verdict


def smol_table(runs: dict[Run, dict]) -> tuple[str, dict]:
    checked, runs = line_check(runs, lambda r: r["run"]["metrics_after_512"]["perplexity"], "perplexity", True), \
        on_own_rounds(runs)
    s = settings("smol")
    tokens = s["steps"] * s["batch_size"] * s["seq_len"]
    lines = [
        f"SmolLM2-135M (embedded) pruned while training on the wiki train split. Recovery budget per run: {s['steps']} "
        f"steps x {s['batch_size']} x {s['seq_len']} tokens = {tokens:,} tokens, lr {s['lr']:g} (cosine, "
        f"{s['warmup']:.0%} warm-up), weight decay {s['weight_decay']:g}, seed 0, float32, {THREADS} threads; rounds of "
        f"K {s['fraction']:g}, θ {s['theta']:g}, their length chosen so that the target is reached by about "
        f"{s['reach_by']:.0%} of the steps (the rest is recovery at the final size). Perplexity on the first "
        f"{s['eval_windows']} held-out wiki windows of {s['eval_seq_len']} tokens (the one-shot tables' protocol; dense "
        f"{SMOL_DENSE_PERPLEXITY:.2f}).", "",
        "| target | layout | method | perplexity | parameters | of dense | rounds | target reached | train min | "
        "median step s | peak RSS MiB | CPU of the times |",
        "|---:|---|---|---:|---:|---:|---|---:|---:|---:|---:|---|"]
    ppl = {}
    for run, result in runs.items():  # planned order: most important first
        ppl[(run.target, run.layout, run.method)] = p = result["run"]["metrics_after_512"]["perplexity"]
        final = result["method_report"]["final_parameters"]
        lines.append(f"| {run.target:.0%} | {run.layout} | {LABELS[run.method]} | {p:.2f} | {_params(final['total'])} | "
                     f"{final['fraction']:.1%} | {_every(result['method_options']['round_steps'])}, K "
                     f"{result['method_options']['fraction']:.2f} | {_reached(result)} | "
                     f"{result['run']['train_seconds'] / 60:.1f} | {result['run']['median_step_seconds']:.2f} | "
                     f"{result['run']['peak_rss_mb']:.0f} | {_machine(result)} |")
    verdict, notes = {}, []
    by_key = {(r.target, r.layout, r.method): res for r, res in runs.items()}
    for target, layout in dict.fromkeys((t, lay) for t, lay, _ in ppl):
        transpa = by_key.get((target, layout, "transpa"))
        for other, key, label in (("structured-l1", "l1", "structured-l1"), ("tsvd", "tsvd", "tSVD")):
            baseline = by_key.get((target, layout, other))
            if transpa and baseline:
                tp, bp = ppl[(target, layout, "transpa")], ppl[(target, layout, other)]
                verdict[f"transpa_below_{key}_{round(100 * target)}_{layout}"] = tp < bp
                notes.append(f"{target:.0%} {layout}: TranSpa {tp:.2f} < {label} {bp:.2f}: {_verdict(tp < bp)}"
                             + _size_caveat(transpa, baseline))
    if notes:
        lines += ["", "Targets: " + "; ".join(notes) + "."]
    for (target, layout, method), magnitude in ppl.items():
        fisher = ppl.get((target, layout, "transpa"))
        if method == "transpa-magnitude" and fisher is not None:
            verdict[f"fisher_below_magnitude_{round(100 * target)}_{layout}"] = fisher < magnitude
            lines += ["", f"Couple selection, {target:.0%} {layout} (TranSpa, the same unit score and rounds): coupled "
                          f"Fisher {fisher:.2f} vs the couples' mean |w| {magnitude:.2f} (the L1-only estimation "
                          f"ablation): Fisher {'better' if fisher < magnitude else 'NOT better'}."]
    if checked[0]:
        lines += ["", checked[0]]
        verdict["line_check"] = checked[1]
    return "\n".join(lines), verdict


def speed_table(speed: dict) -> tuple[str, dict]:
    c, machine = speed["config"], speed["machine"]
    lines = [
        f"Inference speed, interleaved in one process: prefill {c['batch_size']} x {c['prefill_tokens']} tokens "
        f"(last-token logits); decode {c['decode_tokens']} greedy tokens with the KV cache after a {c['context']}-token "
        f"context; medians of {c['repeats']} rounds after {c['warmup']} warm-up; {c['threads']} threads; float32; CPU "
        f"{machine.get('model_name')} ({machine.get('cpu_count')} cores), flags {', '.join(machine.get('flags', []))}; load "
        f"average {speed['load_average']['before']} before, {speed['load_average']['after']} after. Peak memory: each "
        "model loaded and run once (one prefill, one decode) in its own process.", "",
        "| model | parameters | MiB | prefill tokens/s | speed-up | decode tokens/s | speed-up | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in speed["models"]:
        lines.append(f"| {m['label']} | {_params(m['parameters'])} | {m['bytes'] / 2**20:.1f} | "
                     f"{m['prefill_tokens_per_s']:.0f} | {m['speedup_prefill']:.2f}x | {m['decode_tokens_per_s']:.1f} | "
                     f"{m['speedup_decode']:.2f}x | {m.get('peak_rss_mb', float('nan')):.0f} |")
    verdict, notes = {}, []
    uniform = next((m for m in speed["models"] if m["label"].endswith("uniform")), None)
    if uniform:
        verdict["uniform_prefill"] = uniform["speedup_prefill"] >= TARGETS["speed_prefill"]
        verdict["uniform_decode"] = uniform["speedup_decode"] >= TARGETS["speed_decode"]
        notes.append(f"uniform prefill {uniform['speedup_prefill']:.2f}x >= {TARGETS['speed_prefill']}x: "
                     f"{_verdict(verdict['uniform_prefill'])}; uniform decode {uniform['speedup_decode']:.2f}x >= "
                     f"{TARGETS['speed_decode']}x: {_verdict(verdict['uniform_decode'])}")
    free = next((m for m in speed["models"] if m["label"].endswith("free")), None)
    if free:
        notes.append(f"free layout (no target): prefill {free['speedup_prefill']:.2f}x, decode {free['speedup_decode']:.2f}x")
    lines += ["", "Targets: " + "; ".join(notes) + "."]
    return "\n".join(lines), verdict


def encoder_table(runs: dict[Run, dict]) -> tuple[str, dict]:
    checked, runs = line_check(runs, lambda r: r["run"]["metrics_after"]["accuracy"], "accuracy", False), \
        on_own_rounds(runs)
    s = settings("encoder")
    dense, dense_note = stored_encoder_dense()
    any_run = next(iter(runs.values()))
    data = any_run["run"]["data"]
    lines = [
        f"MiniLM-L6 (all-MiniLM-L6-v2) on wiki-topics: {len(data['labels'])} classes, {data.get('train_examples', '?')} "
        f"training / {data.get('eval_examples', '?')} held-out articles, first {s['seq_len']} tokens; {s['steps']} steps x "
        f"{s['batch_size']} examples, lr {s['lr']:g} (cosine, {s['warmup']:.0%} warm-up), weight decay "
        f"{s['weight_decay']:g}, seed 0, float32 (benchmarks/losparse.py's settings). Target {s['target']:.0%} of all "
        f"parameters (embeddings included, so the blocks keep far less), {s['layout']} layout (BERT's uniform layout "
        f"shrinks FFNs only and cannot reach it); rounds of K {s['fraction']:g}, θ {s['theta']:g} planned to reach the "
        f"target by {s['reach_by']:.0%} of the steps" + (
            f" (K {s['fraction']:g}, not TranSpa's {ROUNDS['fraction']:g}: at {ROUNDS['fraction']:g} the rounds stall near "
            "89% of the parameters, Fisher selecting QK couples the θ rule can no longer shrink)"
            if s["fraction"] != ROUNDS["fraction"] else "") + f". {dense_note}.", "",
        "| method | accuracy | macro-F1 | parameters | of dense | block parameters | rounds | target reached | "
        "train s | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    if dense:
        after = dense["run"]["metrics_after"]
        lines.append(f"| dense | {after['accuracy']:.4f} | {after['macro_f1']:.4f} | "
                     f"{_params(dense['size_after']['parameters'])} | 100% | - | - | - | "
                     f"{dense['run']['train_seconds']:.0f} | {dense['run']['peak_rss_mb']:.0f} |")
    metrics, by_method = {}, {}
    for run, result in runs.items():
        after = result["run"]["metrics_after"]
        metrics[run.method], by_method[run.method] = after, result
        final = result["method_report"]["final_parameters"]
        lines.append(f"| {LABELS[run.method]} | {after['accuracy']:.4f} | {after['macro_f1']:.4f} | "
                     f"{_params(final['total'])} | {final['fraction']:.1%} | {_params(final['blocks'])} | "
                     f"{_every(result['method_options']['round_steps'])}, K {result['method_options']['fraction']:.2f} | "
                     f"{_reached(result)} | {result['run']['train_seconds']:.0f} | {result['run']['peak_rss_mb']:.0f} |")
    verdict = {}
    if "transpa" in metrics and "structured-l1" in metrics:
        for key in ("accuracy", "macro_f1"):
            verdict[f"transpa_minus_l1_{key}"] = round(100 * (metrics["transpa"][key] - metrics["structured-l1"][key]), 2)
        lines += ["", "TranSpa minus structured-l1 (points): " + ", ".join(f"{k.removeprefix('transpa_minus_l1_')} "
                                                                           f"{v:+.2f}" for k, v in verdict.items())
                  + f" ({_verdict(verdict['transpa_minus_l1_accuracy'] > 0)} if TranSpa should be more accurate)"
                  + _size_caveat(by_method["transpa"], by_method["structured-l1"]) + "."]
    if checked[0]:
        lines += ["", checked[0]]
        verdict["line_check"] = checked[1]
    return "\n".join(lines), verdict


# ---------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def block_parameters_at(result: dict, step: int) -> int:
    """A scratch run's block parameters after ``step`` (its trajectory's last round up to then; dense: constant)."""
    report = result["method_report"]
    if "trajectory" not in report:
        return result.get("block_parameters_start") or llama_block_parameters(result["model_fields"])
    total = [point["parameters"] for point in report["trajectory"] if point["step"] <= step][-1]
    return total - report["parameters"]["outside_blocks"]


def plot_scratch(runs: dict[Run, dict], path: Path) -> None:
    """Perplexity vs steps, and vs the block parameters each evaluation saw (the path the pruned runs take);
    the other seeds' final perplexities as open markers."""
    plt = _pyplot()
    fig, (curve, size) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {}
    for run, result in seed_zero(runs).items():
        points = scratch_curve(result)
        line, = curve.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=LABELS[run.method])
        colors[run.method] = line.get_color()
        later = [p for p in points if p[0] > 0]  # the random model's ~vocabulary-sized perplexity would flatten it
        size.plot([block_parameters_at(result, p[0]) / 1e6 for p in later], [p[1] for p in later], marker=".",
                  color=colors[run.method], label=LABELS[run.method])
        reached = target_reached_at(result["method_report"])
        if run.method == SCRATCH_TRANSPA and reached is not None:
            curve.axvline(reached, color="grey", ls=":", label=f"{LABELS[run.method]} at its target")
    repeats = [(run, result) for run, result in runs.items() if run.seed and run.method in colors]
    for run, result in repeats:
        final = scratch_curve(result)[-1]
        size.scatter([block_parameters_at(result, final[0]) / 1e6], [final[1]], facecolors="none",
                     edgecolors=colors[run.method])
    curve.set_yscale("log")
    curve.set_xlabel("step")
    curve.set_ylabel("held-out perplexity")
    curve.set_title(f"pre-training from scratch, {settings(next(iter(runs)).suite)['steps']} steps")
    curve.legend()
    size.set_yscale("log")
    size.set_xlabel("block parameters at the evaluation (M)")
    size.set_ylabel("held-out perplexity")
    size.set_title("perplexity vs parameters" + (f" (open: seeds {', '.join(sorted({str(r.seed) for r, _ in repeats}))}, "
                                                 "final)" if repeats else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_smol(runs: dict[Run, dict], path: Path) -> None:
    plt = _pyplot()
    runs = on_own_rounds(runs)
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in ("transpa", "structured-l1", "transpa-l1", "transpa-magnitude", "tsvd"):
        for layout, marker in (("uniform", "o"), ("free", "s")):
            points = sorted((r["method_report"]["final_parameters"]["total"] / 1e6, r["run"]["metrics_after_512"]["perplexity"])
                            for run, r in runs.items() if run.method == method and run.layout == layout)
            if points:
                ax.plot(*zip(*points), marker=marker, label=f"{LABELS[method]} {layout}")
    ax.axhline(SMOL_DENSE_PERPLEXITY, color="grey", ls="--", label="dense")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("perplexity (40 x 512 held-out)")
    ax.set_title("SmolLM2-135M pruned while training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- docs


def _trimmed(result: dict) -> dict:
    """Histories are long: the JSON keeps the final numbers and every 10th step's record."""
    result = json.loads(json.dumps(result))
    if not result["run"].get("history_every"):  # a run restored from the docs is trimmed already
        if result["run"].get("history"):
            result["run"]["early_grad_peak"] = list(early_grad_peak(result)[:2])
        result["run"]["history"] = result["run"]["history"][::10]
        result["run"]["history_every"] = 10
    return result


def build_docs() -> None:
    sections, payload, plots = [], {}, []
    docs = docs_dir()
    docs.mkdir(parents=True, exist_ok=True)

    def add_training_suite(suite: str, title: str, table, plot=None) -> None:
        runs = stored(suite)
        if not seed_zero(on_own_rounds(runs)):  # the seed repeats and line checks only add to a main table
            return
        text, verdict = table(runs)
        if plot is not None:
            plot(runs, docs / f"transpa_{suite}.png")
            plots.append(f"transpa_{suite}.png")
        sections.append(f"### {title}\n\n" + text)
        payload[suite] = {"settings": settings(suite), "verdict": verdict,
                          "runs": {r.name: _trimmed(res) for r, res in runs.items()}}

    add_training_suite("scratch", "Pre-training from scratch", scratch_table, plot_scratch)
    add_training_suite("scratch-long", "Pre-training from scratch, 3x the tokens", scratch_table, plot_scratch)
    add_training_suite("smol", "SmolLM2-135M pruned while training", smol_table, plot_smol)
    speed = stored_speed()
    if speed:
        text, verdict = speed_table(speed)
        sections.append("### Speed of the 70% models\n\n" + text)
        payload["speed"] = {"settings": settings("speed"), "verdict": verdict, "result": speed}
    add_training_suite("encoder", "MiniLM on wiki-topics", encoder_table)
    if not sections:
        return
    body = ("## TranSpa vs structured-l1: structured sparse training (`benchmarks/transpa.py`)\n\n"
            f"TranSpa ranks a selected couple's units by `--unit-score {UNIT_SCORE}` (the default: each unit's "
            "measured contribution on the round's batches; docs/transpa.md says why); structured-l1 by each "
            "matrix's own row / column L1 norms. Both select couples by coupled Fisher (the \"couples by magnitude\" row: "
            "the L1-only estimation ablation, `--couple-score magnitude`), on the same rounds. From "
            "random initialisation `sparseforge train --from-scratch` scores units by the paper's coupled L1 product "
            "instead (the \"TranSpa (L1 unit score)\" rows; the scratch targets are read from them).\n\n"
            + "\n\n".join(sections)
            + ("\n\nPlots: " + ", ".join(f"[{p}]({p})" for p in plots) + "." if plots else ""))
    if SMOKE:
        (docs / "results.md").write_text(body + "\n")
    else:
        write_results_section("transpa", body)
    (docs / "results_transpa.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")


# ---------------------------------------------------------------- driver


def full_minutes_estimate(suite: str, result: dict) -> str:
    """The full setting's minutes of steps from this run's median step, when the smoke's steps are full size."""
    smoke, full = SMOKE_SETTINGS[suite], settings_full(suite)
    if (smoke["batch_size"], smoke["seq_len"]) != (full["batch_size"], full["seq_len"]):
        return f"{full['batch_size']} x {full['seq_len']} tokens per step, not extrapolated from the smoke's"
    return f"≈ {result['run']['median_step_seconds'] * full['steps'] / 60:.0f} min of steps ({full['steps']} steps)"


def report_run(run: Run, seconds: float) -> None:
    result = json.loads(run.path.read_text())
    s = settings(run.suite)
    line = (f"  done in {seconds:.0f}s: median step {result['run']['median_step_seconds']:.3f}s at batch "
            f"{s['batch_size']} x {s['seq_len']} tokens ({s['steps']} steps, train {result['run']['train_seconds']:.0f}s)")
    if SMOKE:
        line += "; full setting: " + full_minutes_estimate(run.suite, result)
    print(line, flush=True)


def run_suite(suite: str, fresh: bool, only: list[str] | None = None) -> None:
    if suite == "speed":
        if not fresh and stored_speed():
            return
        missing = [r.name for r in saved_for_speed() if stored_run(r) is None or not r.model_dir.exists()]
        if missing:
            print(f"speed: skipped, the models of {', '.join(missing)} are not stored yet: run --suite smol first "
                  "(--fresh --run NAME for a run the docs keep without its model)", flush=True)
            return
        print("speed", flush=True)
        started = time.perf_counter()
        run_child([sys.executable, __file__, "--speed-worker"] + (["--smoke"] if SMOKE else []), OUT / "speed.log")
        print(f"  done in {time.perf_counter() - started:.0f}s", flush=True)
        return
    for run in planned(suite):
        if (not fresh and stored_run(run) is not None) or (only and run.name not in only):
            continue
        print(run.name, flush=True)
        started = time.perf_counter()
        run_child([sys.executable, __file__, "--worker", run.name] + (["--smoke"] if SMOKE else []) + probe_args(),
                  OUT / f"{run.name}.log")
        report_run(run, time.perf_counter() - started)
        if not PROBE:
            build_docs()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=[*SUITES, "all"], default="all")
    parser.add_argument("--fresh", action="store_true", help="rerun stored runs too")
    parser.add_argument("--docs-only", action="store_true", help="rebuild the tables from stored runs")
    parser.add_argument("--smoke", action="store_true",
                        help="shrink every setting; work and tables under benchmarks/work/transpa-smoke/")
    parser.add_argument("--run", action="append", metavar="NAME",
                        help="only this run of the suite (repeatable), e.g. smol-transpa-70-free")
    parser.add_argument("--probe", action="append", metavar="KEY=VALUE",
                        help=f"with --run on a scratch suite: train with this setting changed ({', '.join(PROBE_KEYS)}); "
                             "the result goes to benchmarks/work/transpa-probes/, never to the tables")
    parser.add_argument("--worker", metavar="RUN", help=argparse.SUPPRESS)
    parser.add_argument("--speed-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        use_smoke()
    unknown = set(args.run or ()) - {r.name for suite in SUITES for r in planned(suite)}
    if unknown:
        parser.error(f"unknown run {', '.join(sorted(unknown))}: the runs are named SUITE-METHOD[-TARGET-LAYOUT][-seedN][-linear], "
                     "e.g. smol-transpa-70-free")
    if args.probe:
        if not args.worker and (not args.run or args.suite not in SCRATCH_SUITES or args.docs_only):
            parser.error("--probe needs --suite scratch or scratch-long and --run NAME (it never builds the tables)")
        use_probe(parse_probe(args.probe))
    OUT.mkdir(parents=True, exist_ok=True)
    if args.worker:
        worker(args.worker)
        return
    if args.speed_worker:
        speed_worker()
        return
    suites = SUITES if args.suite == "all" else [args.suite]
    for suite in suites if not args.docs_only else []:
        started = time.perf_counter()
        run_suite(suite, args.fresh or bool(PROBE), args.run)
        print(f"suite {suite}: {time.perf_counter() - started:.0f}s", flush=True)
    if PROBE:
        for name in args.run:
            result = json.loads((OUT / f"{name}.json").read_text())
            peak = early_grad_peak(result)
            print(f"probe {name} with {PROBE}: perplexity {result['run']['metrics_after']['perplexity']:.2f}, early "
                  f"gradient peak {peak[0]:.1f} at step {peak[1]} ({OUT / (name + '.json')})", flush=True)
        return
    build_docs()


if __name__ == "__main__":
    main()
