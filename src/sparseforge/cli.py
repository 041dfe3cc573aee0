"""The ``sparseforge`` command line: each subcommand is a thin call into the API."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from . import __version__
from .errors import ConfigError, NotALanguageModel, SparseforgeError
from .export import SAVE_FORMATS
from .methods import ONE_SHOT, RECOVERY, TRAIN_TIME, method_names, methods_help, train_family
from .options import (
    COMPUTE_DTYPES,
    COUPLE_SCORES,
    DTYPES,
    LAYOUTS,
    LOG_LEVELS,
    LOWRANK_EXPORTS,
    LR_SCHEDULES,
    MIXED_PRECISION,
    PROPAGATE,
    PRUNED_ROWS,
    SHRINK_SCHEDULES,
    TASKS,
    UNIT_SCORES,
)
from .validate import OneLineParser, fraction, integer, positive, real

log = logging.getLogger("sparseforge")

PATTERN_HELP = (
    "N:M pattern: N weights KEPT in every group of M consecutive inputs of a row "
    "(NVIDIA's convention). '2:4' = 50%% sparsity, '2:8' = 75%%. Papers that write the "
    "pruned count first call 75%% sparsity '3:4'; here that is '1:4'."
)


def _add_model_args(p, model_help="local HF directory, .gguf file or cached hub id (default: embedded SmolLM2-135M)"):
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="dtype the model is loaded in (statistics are float32 always)")


def _add_eval_args(p, seq_len_help: str = "tokens per window (default 512)", seq_len: int | None = 512):
    p.add_argument("--seq-len", type=integer(2), default=seq_len, help=seq_len_help)
    p.add_argument("--eval-windows", type=integer(0), default=40,
                   help="evaluate on the first N held-out windows; 0 = all (default 40)")
    p.add_argument("--eval-batch-size", type=integer(1), default=1, help="windows per evaluation forward")
    p.add_argument("--text-field", default="text", help="text field of JSONL / dataset sources")


def _add_training_args(p, lr_help: str, weight_decay: float):
    """The optimisation flags every training command shares (fields of train.TrainConfig)."""
    p.add_argument("--steps", type=integer(1), default=100, help="optimizer steps (default 100)")
    p.add_argument("--batch-size", type=integer(1), default=4, help="rows per micro-batch (default 4)")
    p.add_argument("--grad-accum", type=integer(1), default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=positive("1e-4"), default=None, help=lr_help)
    p.add_argument("--weight-decay", type=real(0.0, example="0.01"), default=weight_decay,
                   help=f"AdamW weight decay on matrices (default {weight_decay:g})")
    p.add_argument("--warmup", type=fraction("0.03", zero=True), default=None,
                   help=f"warm-up fraction of the steps (default 0.03; train --from-scratch: {SCRATCH_WARMUP:g})")
    p.add_argument("--schedule", default="cosine", choices=LR_SCHEDULES)
    p.add_argument("--seed", type=integer(0), default=0, help="seed of initialisation, dropout and batch order")
    p.add_argument("--mixed-precision", default="auto", choices=("auto", *MIXED_PRECISION),
                   help="autocast compute; auto (default): bf16 where the CPU (AVX-512 BF16, AMX) or GPU computes it "
                        "natively, else none (float32)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--eval-every", type=integer(0), default=0, help="evaluate every N steps (default: before and after only)")
    p.add_argument("--checkpoint-every", type=integer(0), default=0, help="checkpoint every N steps (default: never)")
    p.add_argument("--checkpoint-dir", default=None, help="where checkpoints go (default OUTPUT.checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint-dir")


def _compute_dtype(requested: str) -> dict:
    """The dtype of the forwards for this machine (``auto`` reads the CPU's features), logged and reported."""
    from .hardware import choose_compute_dtype, cpu_features

    features = cpu_features()
    dtype, reason = choose_compute_dtype(requested, features)
    log.info("compute dtype %s (%s)", dtype, reason)
    return {"requested": requested, "dtype": dtype, "reason": reason, "cpu": features.get("model_name"),
            "flags": features.get("flags")}


def _mixed_precision(requested: str) -> dict:
    """The trainer's autocast for this machine: the compute-dtype choice (``auto``: bf16 only where it is
    native) as a mixed-precision mode."""
    from .hardware import AUTOCAST_MODES

    report = _compute_dtype("float32" if requested == "no" else requested)
    report.update(requested=requested, mixed_precision=AUTOCAST_MODES.get(report["dtype"], "no"))
    return report


def _checkpoint_dir(args) -> str | None:
    """--checkpoint-dir, or OUTPUT.checkpoints beside --output."""
    return args.checkpoint_dir or (f"{args.output.rstrip('/')}.checkpoints" if args.output else None)


def _training_options(args) -> dict:
    """TrainConfig fields from the shared training flags (the checkpoint directory defaults beside --output)."""
    checkpoint_dir = _checkpoint_dir(args)
    args.precision = _mixed_precision(args.mixed_precision)
    options = dict(batch_size=args.batch_size, grad_accum=args.grad_accum, weight_decay=args.weight_decay,
                   schedule=args.schedule, seed=args.seed,
                   mixed_precision=args.precision["mixed_precision"],
                   gradient_checkpointing=args.gradient_checkpointing, eval_every=args.eval_every,
                   checkpoint_every=args.checkpoint_every, checkpoint_dir=checkpoint_dir)
    for name in ("lr", "warmup"):  # unset: TrainConfig's default (train --from-scratch sets its own first)
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.resume and not checkpoint_dir:
        raise ConfigError("--resume needs --checkpoint-dir or --output")
    return options


def _override(text: str) -> tuple[str, str]:
    glob, sep, value = text.partition("=")
    if not sep or not glob or not value:
        raise argparse.ArgumentTypeError(f"'{text}' is not GLOB=SPARSITY_OR_N:M, e.g. '*.down_proj=0.6'")
    _pattern(value)
    return glob, value


def _pattern(text: str) -> str:
    """A sparsity or N:M pattern, checked at once (PatternError is one line naming the fix)."""
    from .sparsity.pattern import Pattern

    try:
        Pattern.parse(text)
    except ConfigError as e:  # argparse would hide a ValueError's message
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


SAVE_FORMAT_HELP = ("dense: a plain HF checkpoint; sparse-bitmask: the pruned block linears as compressed "
                    "tensors (non-zero values + a 1-bit mask; the packed 2:4 layout when every one is 2:4), ~0.66x the "
                    "file at 50%% in 16-bit; loads with sparseforge.load_model, not vanilla transformers; dense in memory")


def _add_save_format(p) -> None:
    p.add_argument("--save-format", default="dense", choices=SAVE_FORMATS, help=SAVE_FORMAT_HELP + " (default dense)")


def _saved(output: str, note: str = "") -> str:
    """The "saved to" line; for compressed weights, their size against the dense file and how to load them."""
    from .export import read_metadata

    report = read_metadata(output).get("save_format")
    if not report:
        return f"saved to {output}{note}"
    if report["format"] == "dense":
        return f"saved to {output}{note} (sparse-bitmask: nothing to compress, {report['reason']}; saved dense)"
    return (f"saved to {output}{note} ({report['format']}: {report['compressed_weights']} weights compressed, "
            f"{report['bytes'] / 2**20:.1f} MiB = {report['ratio']:.3f}x the dense file's {report['dense_bytes'] / 2**20:.1f} "
            "MiB; load it with sparseforge.load_model, dense in memory: vanilla transformers cannot, "
            f"`sparseforge export --format dense {output} OUT` writes a plain checkpoint)")


def build_parser(parser_class: type[argparse.ArgumentParser] = OneLineParser) -> argparse.ArgumentParser:
    """Every subcommand's parser; ``parser_class`` is how a bad command line is reported (recipes raise instead)."""
    parser = parser_class(prog="sparseforge", description="Make transformer LMs sparse and measure it.")
    parser.add_argument("--version", action="version", version=f"sparseforge {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=LOG_LEVELS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="one-shot prune a model on calibration text",
                       description="One-shot pruning, block by block. " + PATTERN_HELP)
    _add_model_args(p)
    p.add_argument("--method", default="sparsegpt", help=methods_help(ONE_SHOT) + " (default sparsegpt)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--sparsity", type=_pattern, default=None, help="fraction of zeros per layer, in [0, 1) (default 0.5)")
    target.add_argument("--pattern", type=_pattern, default=None, help=PATTERN_HELP)
    p.add_argument("--calib", default="wiki", help="calibration text: wiki | FILE.txt | FILE.jsonl | saved dataset dir")
    p.add_argument("--n-calib", type=integer(1), default=32, help="calibration windows (default 32)")
    p.add_argument("--seed", type=integer(0), default=0, help="seed of the calibration window offsets")
    p.add_argument("--propagate", default="pruned", choices=PROPAGATE,
                   help="next block's inputs: outputs of the pruned block (default) or of the dense one")
    p.add_argument("--batch-size", type=integer(1), default=None,
                   help="calibration windows per forward; default all at once (one pass per block)")
    p.add_argument("--low-memory", action="store_true",
                   help="one pass: keep none of the FFN intermediate, recompute it (the lowest peak memory; "
                        "the FFN's first layers run once more; the same result)")
    p.add_argument("--compute-dtype", default="auto", choices=COMPUTE_DTYPES,
                   help="dtype of the calibration forward passes; auto (default): bfloat16 where the CPU (AVX-512 BF16, "
                        "AMX) or GPU computes it natively, else float32 (emulated bf16 is ~10x slower)")
    p.add_argument("--dampening", type=positive("0.01"), default=0.01, help="SparseGPT dampening, fraction of mean diag(H)")
    p.add_argument("--block-size", type=integer(1), default=128, help="SparseGPT column block size")
    p.add_argument("--alpha", type=positive("5"), default=None,
                   help="SparseLLM weight of the output and pre-activation terms (default: 5 SiLU-gated, 0.1 ReLU, 1 GELU)")
    p.add_argument("--beta", type=positive("5"), default=None, help="SparseLLM weight of the activation term (default = alpha)")
    p.add_argument("--iterations", type=integer(0), default=4, help="SparseLLM outer iterations; 0 = SparseGPT (default 4)")
    p.add_argument("--aux-tokens", type=integer(0), default=None,
                   help="SparseLLM: calibration tokens its iterations run on, a seeded random subset (default 3072; "
                        "0 = all). Its SparseGPT start uses every token; the result must beat it on held-out ones")
    p.add_argument("--override", type=_override, action="append", default=[], metavar="GLOB=S",
                   help="per-layer pattern, e.g. 'model.layers.0.*=0.3' or '*.down_proj=2:4' (repeatable)")
    p.add_argument("--skip", action="append", default=[], metavar="GLOB", help="leave matching layers dense (repeatable)")
    p.add_argument("--block-fraction", type=fraction("0.5", one=True), default=1.0, help="prune only the first fraction of blocks")
    p.add_argument("--data", default="wiki", help="evaluation text (held-out split)")
    p.add_argument("--no-eval", action="store_true", help="skip the dense and pruned perplexity")
    _add_eval_args(p)
    p.add_argument("--output", default=None, help="directory for the pruned model (HF format + sparseforge.json)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output directory")
    _add_save_format(p)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON here")

    p = sub.add_parser("finetune", help="recover a pruned model by sparsity-preserving fine-tuning (SPP) or LoRA*",
                       description="Fine-tune a (pruned) model with adapters, merge them, and check that the zero "
                                   "pattern is unchanged. With --prune, prune first (one command: prune -> fine-tune "
                                   "-> evaluate). Runs under `accelerate launch` for several devices.")
    _add_model_args(p, "pruned model directory (default: embedded SmolLM2-135M, then give --prune)")
    p.add_argument("--method", default="spp", help=methods_help(RECOVERY) + " (default spp)")
    p.add_argument("--data", default="wiki",
                   help="training text: wiki | FILE.txt | FILE.jsonl (text, or Alpaca instruction/input/output) | dataset dir")
    p.add_argument("--eval-data", default="wiki", help="held-out text for the perplexity before and after")
    _add_training_args(p, lr_help="peak learning rate (default 4e-3 SPP, 1e-3 LoRA)", weight_decay=1e-3)
    p.add_argument("--rank", type=integer(1), default=None,
                   help="SPP row blocks r (default 16) / LoRA rank (default: matched to SPP's parameter count)")
    p.add_argument("--scale", type=positive("1"), default=1.0, help="SPP delta scale (default 1)")
    p.add_argument("--lora-alpha", type=positive("16"), default=None, help="LoRA alpha (default = rank, i.e. scale 1)")
    p.add_argument("--targets", default=None,
                   help="comma-separated layer names in the blocks, e.g. 'q_proj,v_proj' (default: every linear)")
    p.add_argument("--save-adapter", action="store_true", help="also save the adapter weights (adapter.safetensors)")
    p.add_argument("--prune", default=None, metavar="METHOD",
                   help=f"prune first with this one-shot method ({' | '.join(method_names(ONE_SHOT))})")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--sparsity", type=_pattern, default=None, help="with --prune: fraction of zeros (default 0.5)")
    target.add_argument("--pattern", type=_pattern, default=None, help="with --prune: " + PATTERN_HELP)
    p.add_argument("--n-calib", type=integer(1), default=32, help="with --prune: calibration windows (default 32)")
    _add_eval_args(p)
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity before and after")
    p.add_argument("--output", default=None, help="directory for the merged model (HF format + sparseforge.json)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output directory")
    _add_save_format(p)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON here")

    p = sub.add_parser("train", help="compress a model while training it (LoSparse, ITP, low-rank) or fine-tune it dense",
                       description="Train with a train-time method: the model is compressed while it learns the task, "
                                   "and the output is the compact model (physically fewer parameters). "
                                   + methods_help(TRAIN_TIME))
    _add_model_args(p, "model directory, .gguf, cached hub id, or 'encoder' (the embedded MiniLM); "
                       "default: embedded SmolLM2 for --task lm, MiniLM for --task classify")
    p.add_argument("--method", default="losparse", help=methods_help(TRAIN_TIME) + " (default losparse)")
    p.add_argument("--task", default="lm", choices=TASKS,
                   help="lm: next-token prediction, perplexity; classify: one label per text, accuracy and macro-F1")
    p.add_argument("--data", default=None,
                   help="lm: wiki | FILE.txt | FILE.jsonl | dataset dir (default wiki); classify: wiki-topics | "
                        "FILE.jsonl | FILE.csv | dataset dir (default wiki-topics)")
    p.add_argument("--eval-data", default=None,
                   help="held-out data (lm default: wiki's held-out split; classify default: every 10th record of --data, "
                        "or wiki-topics' held-out split)")
    p.add_argument("--label-field", default="label", help="label field of classification data (strings or numbers)")
    p.add_argument("--keep", type=fraction("0.15", one=True), default=0.15,
                   help="fraction of the block linears' parameters that remain, low-rank part included (default 0.15)")
    p.add_argument("--rank-ratio", type=fraction("0.05"), default=0.05,
                   help="LoSparse: low-rank share of each matrix, rank = ceil(ratio*out*in/(out+in)) (default 0.05)")
    p.add_argument("--beta1", type=fraction("0.85", zero=True), default=0.85, help="sensitivity EMA factor (default 0.85)")
    p.add_argument("--beta2", type=fraction("1", one=True), default=1.0,
                   help="uncertainty EMA factor; 1 = off, as in the reference (default 1)")
    p.add_argument("--initial-steps", type=integer(0), default=None, help="steps before pruning starts (default 10%% of --steps)")
    p.add_argument("--final-steps", type=integer(0), default=None, help="steps at the final budget (default 30%% of --steps)")
    p.add_argument("--mask-interval", type=integer(1), default=None,
                   help="steps between maskings in the cubic phase (default min(10, steps/50))")
    p.add_argument("--pruned-rows", default="stay", choices=PRUNED_ROWS,
                   help="stay: a pruned row never returns (default); train: the reference's (zeroed at each masking, "
                        "trained in between)")
    p.add_argument("--target-params", type=fraction("0.7"), default=0.7,
                   help="transpa / structured-l1 / tsvd: fraction of ALL the model's parameters (embeddings included) to "
                        "reach (default 0.7)")
    p.add_argument("--round-steps", type=integer(1), default=None,
                   help="transpa / structured-l1 / tsvd: steps per removal round (default: a tenth of --steps)")
    p.add_argument("--fraction", type=fraction("0.3"), default=0.3,
                   help="transpa / structured-l1 / tsvd: share K of the couples each round selects (default 0.3)")
    p.add_argument("--theta", type=fraction("0.9"), default=0.9,
                   help="transpa / structured-l1 / tsvd: unit mass a selected couple keeps (default 0.9)")
    p.add_argument("--shrink-schedule", default="theta", choices=SHRINK_SCHEDULES,
                   help="transpa / structured-l1 / tsvd: theta = each round removes what its θ rule says (default, the "
                        "paper's); linear = rounds capped so the parameter count follows a line from the start to the "
                        "target at --reach-by (methods compared on one schedule share the parameter trajectory)")
    p.add_argument("--reach-by", type=fraction("0.6", one=True), default=0.6,
                   help="--shrink-schedule linear: share of --steps at which the line reaches the target (default 0.6)")
    p.add_argument("--couple-score", default="fisher", choices=COUPLE_SCORES,
                   help="transpa / structured-l1 / tsvd: how each round selects its K couples; fisher = coupled Fisher "
                        "over the round's batches (default, the paper's), magnitude = the couples' mean |w| (the "
                        "L1-only estimation ablation)")
    p.add_argument("--unit-score", default=None, choices=UNIT_SCORES,
                   help="transpa: how a selected couple's units are ranked for the θ rule; activation = their measured "
                        "contribution on the round's batches (default), l1 = the paper's coupled L1 product (default "
                        "with --from-scratch) "
                        "(structured-l1 always uses its own L1 norms, tsvd singular directions)")
    p.add_argument("--layout", default="uniform", choices=LAYOUTS,
                   help="transpa / structured-l1 / tsvd: uniform = same sizes in every layer, a plain HF checkpoint (default); "
                        "free = per-layer sizes, loads with sparseforge.load_model")
    p.add_argument("--from-scratch", default=None, metavar="CONFIG",
                   help="train a new randomly initialised LLaMA-style decoder instead of --model: a JSON file of "
                        f"LlamaConfig fields or a preset ({', '.join(sorted(SCRATCH_PRESETS))}); the embedded SmolLM2 "
                        "tokenizer's vocabulary")
    _add_training_args(p, lr_help="peak learning rate (default 1e-4 for --task lm, 5e-4 for classify, "
                                  f"{SCRATCH_LR:g} with --from-scratch)", weight_decay=0.01)
    p.add_argument("--seq-len", type=integer(2), default=None, help="tokens per example (default 512 lm, 128 classify)")
    p.add_argument("--eval-windows", type=integer(0), default=40, help="lm: the first N held-out windows; 0 = all (default 40)")
    p.add_argument("--eval-batch-size", type=integer(1), default=None, help="examples per evaluation forward")
    p.add_argument("--text-field", default="text", help="text field of JSONL / CSV / dataset sources")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation before and after")
    p.add_argument("--export", default="compact", choices=LOWRANK_EXPORTS,
                   help="compact: U, V and S's kept rows (smaller, faster; loads with sparseforge); dense: merged plain "
                        "weights that vanilla transformers loads (saves nothing)")
    p.add_argument("--output", default=None, help="directory for the trained model (+ sparseforge.json)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output directory")
    _add_save_format(p)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON here")

    p = sub.add_parser("eval", help="perplexity (or classification accuracy / macro-F1) of a model on held-out data")
    _add_model_args(p, "model directory, .gguf, cached hub id or 'encoder' (default: embedded SmolLM2-135M)")
    p.add_argument("--task", default=None, choices=TASKS,
                   help="default: the saved model's (a sequence classifier is evaluated on --data's labels)")
    p.add_argument("--data", default=None,
                   help="lm: wiki | FILE.txt | FILE.jsonl | dataset dir (default wiki); classify: wiki-topics | FILE")
    p.add_argument("--label-field", default="label", help="label field of classification data")
    _add_eval_args(p, "tokens per window / per text (default 512 lm, 128 classify)", seq_len=None)
    p.add_argument("--tasks", default=None,
                   help="zero-shot lm-eval tasks instead of perplexity, comma-separated: sparseforge_wiki (built in, no "
                        "download), or any lm-eval task whose dataset is in the local cache (hellaswag, arc_easy...); "
                        "add 'perplexity' for both. Needs pip install 'sparseforge[eval]'")
    p.add_argument("--limit", type=integer(1), default=None, help="--tasks: the first N examples of each task (default all)")
    p.add_argument("--batch-size", dest="eval_batch_size", metavar="N", type=integer(1), default=argparse.SUPPRESS,
                   help="same as --eval-batch-size (examples per forward)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON here")

    p = sub.add_parser("bench-speed", help="prefill and decode tokens/s of several models, measured interleaved",
                       description="Load each --model and measure prefill and decode tokens/s, every round running every "
                                   "model once (A B A B ...); the first model is the baseline of the speed-ups.")
    p.add_argument("--model", action="append", default=None,
                   help="model directory, .gguf, cached hub id or 'encoder' (repeatable; default: the embedded SmolLM2 once)")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--prefill-tokens", type=integer(1), default=512, help="prefill context length (default 512)")
    p.add_argument("--decode-tokens", type=integer(0), default=64, help="greedy tokens decoded with the KV cache (default 64)")
    p.add_argument("--context", type=integer(1), default=512, help="context before decoding (default 512)")
    p.add_argument("--batch-size", type=integer(1), default=1, help="sequences per forward (default 1)")
    p.add_argument("--repeats", type=integer(1), default=5, help="measured rounds (default 5)")
    p.add_argument("--warmup", type=integer(0), default=1, help="unmeasured rounds first (default 1)")
    p.add_argument("--threads", type=integer(1), default=None, help="torch threads (default: torch's)")
    p.add_argument("--memory", action="store_true", help="also the peak memory of each model, in a fresh process each")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results (with the machine's features) here")

    p = sub.add_parser("export", help="rewrite a saved model: compressed sparse weights or a plain dense checkpoint",
                       description="Load MODEL (a directory sparseforge or llm-compressor saved, or a .gguf) and write it "
                                   "to OUTPUT in --format, with its tokenizer and sparseforge.json. --format dense gives a "
                                   "checkpoint vanilla transformers loads (compact LoSparse / TranSpa free-layout models "
                                   "keep their compact layers and still need sparseforge.load_model).")
    p.add_argument("model", help="saved model directory or .gguf file")
    p.add_argument("output", help="directory to write")
    p.add_argument("--format", required=True, choices=SAVE_FORMATS, help=SAVE_FORMAT_HELP)
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="dtype of the written weights (default: the dtype MODEL was saved in)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT directory")

    p = sub.add_parser("info", help="sparsity, N:M patterns and settings of a saved model")
    p.add_argument("model", nargs="?", default=None, help="model directory (default: embedded SmolLM2-135M)")
    p.add_argument("--layers", action="store_true", help="list every layer")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the summary as JSON here")

    p = sub.add_parser("run", help="run a recipe: prune, finetune, train, eval, bench-speed, export stages from one YAML file",
                       description="Run the stages of a recipe in order, each stage's model the previous one's output, "
                                   "every output and a combined report (report.json, report.md) in one directory. Every "
                                   "stage's settings are checked before the first runs. See docs/recipes.md and recipes/.")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--output", default=None, help="directory for the stages' outputs and the report (default: the recipe's output:)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="change a setting: STAGE.KEY=VALUE with STAGE a stage number or kind (every stage of that kind), "
                        "defaults.KEY=VALUE, or model= / output= / seed=; e.g. --set finetune.steps=8 (repeatable)")
    p.add_argument("--from-stage", type=integer(1), default=None, metavar="N",
                   help="resume in --output: reuse the finished outputs of stages 1..N-1, run stage N onwards")
    p.add_argument("--check", action="store_true", help="check every stage and print its command line; run nothing")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of a previous run in --output")
    return parser


def _only_checking(args) -> bool:
    """True when a recipe is checking this stage: the command stops after the checks it runs before any slow work."""
    return getattr(args, "check_only", False)


def _check_paths(args, inputs: tuple = ()) -> None:
    """--output and --json can be written as asked, and --output is not an input: before any work."""
    from .export import check_json_path, check_output

    if getattr(args, "output", None):
        check_output(args.output, getattr(args, "overwrite", False),
                     inputs=[p for p in (getattr(args, "model", None), *inputs) if p])
    if getattr(args, "json", None) and args.json != "-":
        parent = Path(args.json).absolute().parent
        out_parent = Path(args.output).absolute().parent if getattr(args, "output", None) else None
        # a --json beside --output (e.g. out/model and out/model.json) goes into the directory the save creates
        if not (out_parent is not None and not parent.exists() and (parent == out_parent or parent in out_parent.parents)):
            check_json_path(args.json)


def _write_json(path: str | None, payload: dict) -> None:
    """JSON to stdout ("-") or to ``path``, written whole or not at all."""
    if path:
        text = json.dumps(payload, indent=2) + "\n"
        if path == "-":
            sys.stdout.write(text)
        else:
            tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
            try:
                tmp.write_text(text)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)


def _eval(model, tokenizer, args) -> dict:
    from .api import evaluate

    if args.eval_batch_size < 1:
        raise ConfigError(f"--eval-batch-size {args.eval_batch_size} must be at least 1")
    return evaluate(model, tokenizer, data=args.data, seq_len=args.seq_len, max_windows=args.eval_windows or None,
                    batch_size=args.eval_batch_size, text_field=args.text_field)


def cmd_prune(args) -> int:
    from .api import calibration_data, prune
    from .export import save
    from .loading import load_model
    from .measure import peak_rss_mb
    from .oneshot.engine import OneShotConfig
    from .oneshot.methods import get_method
    from .preflight import check_prune_plan
    from .sparsity.pattern import Pattern

    started = time.perf_counter()
    pattern = Pattern.parse(args.pattern if args.pattern is not None else (args.sparsity or "0.5"))
    # every setting is checked before the slow steps: numbers, paths, then the pattern against the layers
    compute = _compute_dtype(args.compute_dtype)
    config = OneShotConfig(
        method=args.method, pattern=pattern, overrides=dict(args.override), skip=tuple(args.skip),
        block_fraction=args.block_fraction, propagate=args.propagate, batch_size=args.batch_size,
        low_memory=args.low_memory, compute_dtype=compute["dtype"], dampening=args.dampening, block_size=args.block_size,
        alpha=args.alpha, beta=args.beta, iterations=args.iterations,
        **({} if args.aux_tokens is None else {"aux_tokens": args.aux_tokens}),
    )
    _check_paths(args)
    check_prune_plan(args.model, config)
    if _only_checking(args):
        return 0
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    calibration = None
    if get_method(args.method).stats_kind is not None:
        calibration = calibration_data(model, tokenizer, args.calib, args.n_calib, args.seq_len, args.seed,
                                       args.text_field)
    dense = None if args.no_eval else _eval(model, tokenizer, args)
    report = prune(model, tokenizer, method=args.method, pattern=str(pattern), calibration=calibration,
                   **{k: v for k, v in vars(config).items() if k not in ("method", "pattern")})
    report.calibration.update(source=args.calib, seed=args.seed)
    pruned = None if args.no_eval else _eval(model, tokenizer, args)
    results = {
        "model": args.model or "embedded:SmolLM2-135M-Instruct",
        "dtype": args.dtype,
        "compute_dtype": compute,
        "pruning": report.to_dict(),
        "metrics": {
            "dense": dense,
            "pruned": pruned,
            "sparsity": report.sparsity,
            "prune_seconds": round(report.seconds, 3),
            "total_seconds": round(time.perf_counter() - started, 3),
            "peak_rss_mb": round(peak_rss_mb(), 1),
        },
    }
    print(f"method {args.method}  pattern {pattern}  layers {len(report.layers)}  "
          f"calibration {report.n_windows} x {report.seq_len} tokens")
    if dense and pruned:
        print(f"perplexity  dense {dense['perplexity']:.3f}  pruned {pruned['perplexity']:.3f}  "
              f"({pruned['n_windows']} windows x {pruned['seq_len']} tokens of {args.data})")
    print(f"sparsity {report.sparsity:.4f}  prune time {report.seconds:.1f}s  peak RSS {peak_rss_mb():.0f} MiB")
    if args.output:
        save(model, tokenizer, args.output, metadata=results, overwrite=args.overwrite, save_format=args.save_format)
        print(_saved(args.output))
    _write_json(args.json, results)
    return 0


def cmd_finetune(args) -> int:
    from .api import evaluate, prune
    from .export import read_metadata, save
    from .loading import load_model
    from .peft import AdapterConfig, target_layers
    from .recovery import finetune, save_adapter
    from .sparsity.pattern import Pattern
    from .train import TrainConfig

    started = time.perf_counter()
    if args.prune is None and (args.sparsity or args.pattern):
        raise ConfigError("--sparsity/--pattern need --prune METHOD (or give an already pruned --model)")
    pattern = Pattern.parse(args.pattern or args.sparsity or "0.5") if args.prune else None
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip()) if args.targets else None
    train = _training_options(args)
    TrainConfig(steps=args.steps, **train)  # validate before the slow steps
    AdapterConfig(method=args.method, rank=args.rank, scale=args.scale, lora_alpha=args.lora_alpha)
    _check_paths(args)
    if args.prune:
        from .oneshot.engine import OneShotConfig
        from .preflight import check_prune_plan

        check_prune_plan(args.model, OneShotConfig(method=args.prune, pattern=pattern))
    if _only_checking(args):
        return 0
    model_dir = Path(args.model) if args.model else None
    previous = read_metadata(model_dir) if model_dir is not None and model_dir.is_dir() else {}
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    target_layers(model, targets)  # a bad --targets fails before pruning
    pruning = previous.get("pruning")
    dense = None
    if args.prune:
        if not args.no_eval:
            dense = evaluate(model, tokenizer, data=args.eval_data, seq_len=args.seq_len,
                             max_windows=args.eval_windows or None, text_field=args.text_field, progress=False)
        report = prune(model, tokenizer, method=args.prune, pattern=str(pattern), n_calib=args.n_calib,
                       seq_len=args.seq_len, seed=args.seed, text_field=args.text_field)
        pruning = report.to_dict()
        print(f"pruned with {args.prune} {pattern}: sparsity {report.sparsity:.4f} in {report.seconds:.1f}s")
    result = finetune(model, tokenizer, method=args.method, data=args.data, steps=args.steps, seq_len=args.seq_len,
                      text_field=args.text_field, rank=args.rank, scale=args.scale, lora_alpha=args.lora_alpha,
                      targets=targets, eval_data=args.eval_data, eval_windows=args.eval_windows or None,
                      evaluate=not args.no_eval, resume=args.resume, **train)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under `accelerate launch`: one process reports and saves
        return 0
    summary = result.to_dict()
    results = {
        "model": args.model or "embedded:SmolLM2-135M-Instruct",
        "dtype": args.dtype,
        "mixed_precision": args.precision,
        "pruning": pruning,
        "finetune": summary,
        "metrics": {
            "dense": dense,
            "pruned": result.perplexity_before,
            "finetuned": result.perplexity_after,
            "pattern_identical": result.pattern["identical"],
            "total_seconds": round(time.perf_counter() - started, 3),
            "peak_rss_mb": result.peak_rss_mb,
        },
    }
    t = result.trainable
    print(f"method {args.method}  trainable {t['trainable']:,} ({t['per_mille']:.2f} per mille)  steps {args.steps}  "
          f"median step {result.median_step_seconds:.3f}s  peak RSS {result.peak_rss_mb:.0f} MiB")
    if result.perplexity_before and result.perplexity_after:
        print((f"perplexity  dense {dense['perplexity']:.3f}  " if dense else "perplexity  ")
              + f"before {result.perplexity_before['perplexity']:.3f}  after {result.perplexity_after['perplexity']:.3f}")
    p = result.pattern
    print(f"zero pattern {'identical' if p['identical'] else 'CHANGED'}: {p['zeros_before']:,} zeros before, "
          f"{p['zeros_after']:,} after")
    if args.output:
        extra = {"adapter.safetensors": lambda path: save_adapter(result.adapter_weights, path)} \
            if args.save_adapter else None
        save(model, tokenizer, args.output, metadata=results, overwrite=args.overwrite, extra_files=extra,
             save_format=args.save_format)
        print(_saved(args.output))
    _write_json(args.json, results)
    return 0


#: --from-scratch's: at lr 3e-3 a short warm-up lets the full-size scratch model's gradients spike early, and a
#: spiked run ends far behind (benchmarks/transpa.py, docs/transpa.md: dense seed 1 179.3 at 5%, 104.1 at 15%)
SCRATCH_WARMUP = 0.15
#: --from-scratch's default peak lr: pre-training a small decoder wants a far larger step than fine-tuning's 1e-4
#: (benchmarks/scratch_sizes.py: on the scratch model 3e-3 beat 1e-3 and 3e-4)
SCRATCH_LR = 3e-3
#: --from-scratch presets: LlamaConfig fields (the vocabulary is the embedded tokenizer's)
SCRATCH_PRESETS = {
    "llama-tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True),
    "llama-small": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=9,
                        num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True),
}


def _scratch_config(source: str) -> dict:
    """LlamaConfig fields of --from-scratch (a preset name or a JSON file); ConfigError unless a LLaMA-style decoder."""
    if source in SCRATCH_PRESETS:
        return dict(SCRATCH_PRESETS[source])
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"--from-scratch '{source}' is neither a JSON config file nor a preset "
                          f"({', '.join(sorted(SCRATCH_PRESETS))})")
    try:
        fields = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"--from-scratch {path} is not a JSON config: {str(e).splitlines()[0]}") from None
    if not isinstance(fields, dict):
        raise ConfigError(f"--from-scratch {path} must hold a JSON object of LlamaConfig fields")
    model_type = fields.pop("model_type", "llama")
    architectures = fields.pop("architectures", None) or []
    if model_type != "llama" or fields.get("is_encoder_decoder") or any(not a.endswith("ForCausalLM") for a in architectures):
        raise ConfigError(f"--from-scratch {path} describes a '{model_type}' model: it builds a LLaMA-style decoder only "
                          "(model_type llama, LlamaConfig fields)")
    return fields


def _scratch_model(source: str, seed: int):
    """A seeded random LlamaForCausalLM (GPT-2's scaled residual init) and the embedded SmolLM2 tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig

    from .assets import embedded_model_gguf
    from .loading import gguf_to_directory
    from .models.init import random_llama

    fields = _scratch_config(source)
    tokenizer = AutoTokenizer.from_pretrained(gguf_to_directory(embedded_model_gguf()))
    vocab = fields.setdefault("vocab_size", len(tokenizer))
    if not isinstance(vocab, int) or vocab < len(tokenizer):
        raise ConfigError(f"--from-scratch vocab_size {vocab} is smaller than the tokenizer's {len(tokenizer)}: drop it")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        fields.setdefault(key, getattr(tokenizer, key))
    try:
        model = random_llama(LlamaConfig(**fields), seed)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--from-scratch {source}: {str(e).splitlines()[0]}") from None
    return model.eval(), tokenizer


def _method_options(args) -> dict:
    family = train_family(args.method)
    if family == "dense":
        return {}
    if family == "transpa":
        return dict(method=args.method, target_params=args.target_params,
                    round_steps=args.round_steps or max(1, args.steps // 10), fraction=args.fraction, theta=args.theta,
                    layout=args.layout, unit_score=args.unit_score, shrink_schedule=args.shrink_schedule, reach_by=args.reach_by,
                    couple_score=args.couple_score)
    return dict(method=args.method, keep=args.keep, rank_ratio=args.rank_ratio, beta1=args.beta1, beta2=args.beta2,
                initial_steps=args.initial_steps, final_steps=args.final_steps, interval=args.mask_interval,
                pruned_rows=args.pruned_rows)


def _drop(options: dict, key: str) -> dict:
    return {k: v for k, v in options.items() if k != key}


def cmd_train(args) -> int:
    import torch

    from .export import save
    from .loading import load_model
    from .measure import peak_rss_mb
    from .methods import build_train_method
    from .models.modules import model_structure
    from .train import TrainConfig
    from .training import train

    started = time.perf_counter()
    data = args.data or ("wiki" if args.task == "lm" else "wiki-topics")
    if args.from_scratch is not None:
        args.lr = SCRATCH_LR if args.lr is None else args.lr
        args.warmup = SCRATCH_WARMUP if args.warmup is None else args.warmup
        if args.method == "transpa" and args.unit_score is None:
            # the measured-contribution score is for pretrained models, whose few large-activation neurons the
            # L1 product ranks lowest; from random init the paper's L1 product scored better (docs/transpa.md)
            args.unit_score = "l1"
    train_options = _training_options(args)
    TrainConfig(steps=args.steps, **train_options)  # validate every setting before the slow steps
    options = _method_options(args)
    family = train_family(args.method)
    method = build_train_method(args.method, args.steps, _drop(options, "method"))
    if args.from_scratch is not None:
        if args.model is not None:
            raise ConfigError("--from-scratch builds a new model: drop --model (or drop --from-scratch to train --model)")
        if args.task != "lm":
            raise ConfigError("--from-scratch builds a causal LM decoder: use --task lm")
        _scratch_config(args.from_scratch)  # a bad config fails before the slow steps
    _check_paths(args)
    if _only_checking(args):
        return 0
    splits, labels = None, None
    if args.task == "classify":
        from .train.labelled import classification_splits

        splits = classification_splits(data, args.eval_data, args.text_field, args.label_field)
        labels = splits[2].names
    torch.manual_seed(args.seed)  # a new classification head is drawn here
    if args.from_scratch is not None:
        model, tokenizer = _scratch_model(args.from_scratch, args.seed)
        model.to(getattr(torch, args.dtype))
    else:
        model, tokenizer = load_model(args.model, dtype=args.dtype, task=args.task, label_names=labels)
    if family == "transpa":
        method.check(model)  # the target against the embeddings' share, before any training
    report = train(model, tokenizer, method=args.method, task=args.task, data=splits or data, eval_data=args.eval_data,
                   seq_len=args.seq_len, text_field=args.text_field, label_field=args.label_field,
                   eval_windows=args.eval_windows or None, eval_batch_size=args.eval_batch_size, evaluate=not args.no_eval,
                   resume=args.resume, method_options=_drop(options, "method"), steps=args.steps, **train_options)
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    run = report.run
    exported = args.export if family != "transpa" else ("plain" if args.layout == "uniform" else "structure")
    if exported == "dense":
        from .lowrank.method import densify

        densify(model)
    results = {
        "model": (f"from-scratch:{args.from_scratch}" if args.from_scratch is not None else
                  args.model or ("embedded:SmolLM2-135M-Instruct" if args.task == "lm" else "embedded:all-MiniLM-L6-v2")),
        "dtype": args.dtype,
        "mixed_precision": args.precision,
        "train": report.to_dict(),
        "export": exported,
        "metrics": {"before": run["metrics_before"], "after": run["metrics_after"],
                    "parameters": {"before": report.size_before, "after": report.size_after},
                    "train_seconds": run["train_seconds"], "total_seconds": round(time.perf_counter() - started, 3),
                    "peak_rss_mb": round(peak_rss_mb(), 1)},
    }
    _print_train_summary(args, report)
    if args.output:
        # save() records the shapes config.json cannot rebuild (compact layers, shrunk linears)
        save(model, tokenizer, args.output, metadata=results, overwrite=args.overwrite, save_format=args.save_format)
        note = {"dense": " (dense export: vanilla transformers loads it; it saves nothing)",
                "plain": " (uniform layout: a plain HF checkpoint, vanilla transformers loads it)"}.get(exported)
        if note is None or model_structure(model) is not None:  # e.g. a dense export that keeps compact attention
            note = " (compact or narrowed layers: load with sparseforge.load_model)"
        print(_saved(args.output, note))
    _write_json(args.json, results)
    return 0


def _print_train_summary(args, report) -> None:
    run, method = report.run, report.method_report
    before, after = run["metrics_before"], run["metrics_after"]
    print(f"method {args.method}  task {args.task}  steps {args.steps}  median step {run['median_step_seconds']:.3f}s  "
          f"train {run['train_seconds']:.1f}s  peak RSS {run['peak_rss_mb']:.0f} MiB")
    if after:
        if args.task == "classify":
            print(f"accuracy {after['accuracy']:.4f}  macro-F1 {after['macro_f1']:.4f}  ({after['n_examples']} held-out "
                  f"examples; before training {before['accuracy']:.4f})")
        else:
            print(f"perplexity  before {before['perplexity']:.3f}  after {after['perplexity']:.3f}")
    if "trajectory" in method:
        steps = ", ".join(f"{t['step']}: {t['parameters']:,}" for t in method["trajectory"])
        final = method["final_parameters"]
        reached = "target reached" if method["reached_target"] else "TARGET NOT REACHED: raise --steps or lower --round-steps"
        print(f"parameters by step: {steps}  ({method['rounds']} rounds, {reached})")
        print(f"final: {final['total']:,} parameters ({final['fraction']:.2%} of the start), {final['blocks']:,} in the blocks; "
              f"{method['layout']} layout")
        for layer in method["layers"]:
            dims = " ".join(f"{g['qk_dim']}/{g['v_dim']}" for g in layer["groups"])
            print(f"  block {layer['block']}: FFN {layer['ffn']}, {layer['kv_groups']} KV groups (QK/V dims {dims})")
    targets = method.get("target_parameters")
    if targets:
        print(f"block linears: {targets['compact']:,} of {targets['dense']:,} weights kept ({targets['kept_fraction']:.2%}; "
              "biases, embeddings and the task head stay dense, outside the budget)")
    b, a = report.size_before, report.size_after
    print(f"model: {a['parameters']:,} parameters, {a['bytes'] / 2**20:.1f} MiB (dense {b['parameters']:,}, "
          f"{b['bytes'] / 2**20:.1f} MiB)")


def _zero_shot_tasks(args):
    """--tasks, checked before the model loads: (lm-eval task names, perplexity too?, task manager), or None."""
    if args.tasks is None:
        if args.limit is not None:
            raise ConfigError("--limit counts the examples of --tasks: add --tasks NAME,... or drop --limit")
        return None
    if args.task == "classify":
        raise ConfigError("--tasks scores a causal language model: drop --task classify")
    from .eval.harness import parse_task_list, prepare_tasks

    names = parse_task_list(args.tasks)
    tasks = [name for name in names if name != "perplexity"]
    return tasks, len(tasks) < len(names), prepare_tasks(tasks) if tasks else None


def cmd_eval(args) -> int:
    from .loading import load_model
    from .training import DEFAULT_SEQ_LEN

    _check_paths(args)
    zero_shot = _zero_shot_tasks(args)
    if _only_checking(args):
        return 0
    try:
        model, tokenizer = load_model(args.model, dtype=args.dtype, task="lm" if zero_shot else args.task)
    except NotALanguageModel as error:
        if not zero_shot:
            raise
        reason = str(error).rpartition(":")[0]  # the loader's advice (--task classify) does not apply to --tasks
        raise NotALanguageModel(f"{reason}: --tasks scores causal language models; evaluate this one without --tasks "
                                "(accuracy with --task classify)") from None
    if not zero_shot and (getattr(model.config, "architectures", None)
                          and model.config.architectures[0].endswith("ForSequenceClassification") or args.task == "classify"):
        return _eval_classification(model, tokenizer, args)
    args.data = args.data or "wiki"
    args.seq_len = args.seq_len or DEFAULT_SEQ_LEN["lm"]
    tasks, with_perplexity, manager = zero_shot or ([], True, None)
    result = {}
    if with_perplexity:
        result = _eval(model, tokenizer, args)
        print(f"perplexity {result['perplexity']:.3f}  ({result['n_windows']} windows x {result['seq_len']} tokens "
              f"of {args.data}, {result['seconds']:.1f}s)")
    if tasks:
        from .eval.harness import format_table, run_tasks

        scores = run_tasks(model, tokenizer, tasks, limit=args.limit, batch_size=args.eval_batch_size, manager=manager)
        result["tasks"] = scores.pop("tasks")
        result["lm_eval"] = scores
        print(format_table(result["tasks"]))
    result["model"] = args.model or "embedded:SmolLM2-135M-Instruct"
    print(json.dumps(result))
    _write_json(args.json, result)
    return 0


def _eval_classification(model, tokenizer, args) -> int:
    from .eval.classification import classification_metrics
    from .train.labelled import LabelSet, classification_examples, read_labelled
    from .training import DEFAULT_SEQ_LEN

    config = model.config
    labels = LabelSet([config.id2label[i] for i in range(config.num_labels)])
    texts = read_labelled(args.data or "wiki-topics", args.text_field, args.label_field, split="eval")
    examples = classification_examples(tokenizer, texts, labels, args.seq_len or DEFAULT_SEQ_LEN["classify"])
    result = classification_metrics(model, examples, batch_size=max(args.eval_batch_size, 32))
    result.update(model=args.model, data=texts.source)
    print(f"accuracy {result['accuracy']:.4f}  macro-F1 {result['macro_f1']:.4f}  ({result['n_examples']} examples of "
          f"{texts.source}, {result['seconds']:.1f}s)")
    print(json.dumps(result))
    _write_json(args.json, result)
    return 0


def cmd_info(args) -> int:
    from .eval.sparsity_report import sparsity_summary, structure_summary
    from .export import read_metadata
    from .loading import load_model

    _check_paths(args)
    if _only_checking(args):
        return 0
    if args.model is not None:
        read_metadata(args.model)  # a clear error for a missing model
    model, _ = load_model(args.model)
    summary = sparsity_summary(model)
    meta = read_metadata(args.model) if args.model else {}
    summary["pruned_with"] = meta.get("pruning", {}).get("config")
    summary["calibration"] = meta.get("pruning", {}).get("calibration")
    summary["metrics"] = meta.get("metrics")
    print(f"{summary['architecture']}: {summary['parameters']:,} parameters, "
          f"{summary['nonzero_parameters']:,} non-zero ({summary['model_sparsity']:.2%} zeros overall)")
    print(f"prunable block linears: {summary['prunable_parameters']:,} parameters, "
          f"{summary['prunable_sparsity']:.2%} zeros in {len(summary['layers'])} layers")
    patterns = sorted({str(l["pattern"]) for l in summary["layers"]})
    print(f"N:M patterns satisfied: {', '.join(patterns)}")
    if summary["pruned_with"]:
        cfg = summary["pruned_with"]
        print(f"pruned with {cfg['method']} pattern {cfg['pattern']} propagate {cfg['propagate']}")
    structure = structure_summary(model)
    summary["structure"] = structure
    if structure:
        trained = meta.get("train", {}).get("method")  # absent where a later prune or fine-tune saved it
        print(f"compact layers: {len(structure)}, {sum(s['parameters'] for s in structure):,} parameters"
              + (f" (trained with {trained})" if trained else ""))
    if args.layers:
        for layer in summary["layers"]:
            print(f"  {layer['name']:<40} {str(layer['shape']):<14} {layer['sparsity']:.4f}  {layer['pattern'] or '-'}")
        for item in structure:
            s = item["structure"]
            print(f"  {item['name']:<40} {s['class']:<22} rank {s.get('rank', '-'):>4}  rows {s.get('rows', '-'):>5} of "
                  f"{s.get('out_features', '-'):<5} {item['parameters']:>10,} parameters")
    _write_json(args.json, summary)
    return 0


def cmd_bench_speed(args) -> int:
    from .eval.speed import NOTE, SpeedConfig, benchmark_speed, format_speed_table, measure_peak_memory
    from .loading import load_model

    for name in ("prefill_tokens", "decode_tokens", "context", "batch_size", "repeats"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    if args.warmup < 0 or (args.threads is not None and args.threads < 1):
        raise ConfigError("--warmup must be at least 0 and --threads at least 1")
    _check_paths(args)
    if _only_checking(args):
        return 0
    config = SpeedConfig(prefill_tokens=args.prefill_tokens, decode_tokens=args.decode_tokens, context=args.context,
                         batch_size=args.batch_size, repeats=args.repeats, warmup=args.warmup, threads=args.threads)
    sources = args.model or [None]
    labels = []
    for source in sources:
        label = "embedded:SmolLM2-135M-Instruct" if source is None else str(source).rstrip("/")
        labels.append(label if label not in labels else f"{label}#{len(labels)}")
    models = [(label, load_model(source, dtype=args.dtype)[0]) for label, source in zip(labels, sources)]
    result = benchmark_speed(models, config)
    if args.memory:
        for entry, source in zip(result["models"], sources):
            entry["memory"] = measure_peak_memory(source, config)
            entry["peak_rss_mb"] = entry["memory"]["peak_rss_mb"]
    print(format_speed_table(result))
    print(f"Note: {NOTE}.")
    _write_json(args.json, result)
    return 0


def cmd_export(args) -> int:
    from .export import export_model

    _check_paths(args)
    if _only_checking(args):
        return 0
    started = time.perf_counter()
    export_model(args.model, args.output, args.format, overwrite=args.overwrite, dtype=args.dtype)
    plain = " (a plain checkpoint: vanilla transformers loads it unless it has compact layers)" \
        if args.format == "dense" else ""
    print(_saved(args.output, plain) + f"  [{time.perf_counter() - started:.1f}s]")
    return 0


def cmd_run(args) -> int:
    from .recipe import run_recipe

    return run_recipe(args)


COMMANDS = {"prune": cmd_prune, "finetune": cmd_finetune, "train": cmd_train, "eval": cmd_eval, "info": cmd_info,
            "bench-speed": cmd_bench_speed, "export": cmd_export, "run": cmd_run}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is so that every cleanup (``finally``) runs as for Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a bad command line (one line, printed by the parser)
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(name)s %(message)s",
                        stream=sys.stderr)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return COMMANDS[args.command](args)
    except SparseforgeError as e:
        _close_progress_bars()
        print(f"sparseforge: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        _close_progress_bars()
        what = "terminated" if isinstance(e, Terminated) else "interrupted"
        print(f"sparseforge: {what}; no output was written{_kept_checkpoints(args)}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _close_progress_bars() -> None:
    """End the bars an interruption left open, so the last line on stderr is the message, not a bar."""
    if "tqdm" in sys.modules:
        from tqdm.std import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _kept_checkpoints(args) -> str:
    """An interrupted training run keeps the checkpoints it was asked to write: say where they are."""
    if not getattr(args, "checkpoint_every", 0):
        return ""
    directory = _checkpoint_dir(args)
    if directory and any(Path(directory).glob("step-*")):
        return f" (the checkpoints in {directory} are kept: add --resume to continue)"
    return ""


if __name__ == "__main__":
    sys.exit(main())
