#!/usr/bin/env python
"""One-shot pruning benchmark on SmolLM2-135M: quality, time, memory, vs llm-compressor.

    .venv/bin/python benchmarks/oneshot.py                 # everything (peer too if set up)
    .venv/bin/python benchmarks/oneshot.py --only sparsegpt:0.5 --no-peer

Every configuration runs in its own process (so peak RSS is that run's alone)
on the same calibration windows (32 x 512 tokens of the wiki train split, seed
0) and is evaluated by the same evaluator on the first 40 held-out windows of
512 tokens. llm-compressor runs from its own venv (``make bench-peer`` makes
it) on the very same windows; its pruned model is evaluated here. Results go to
``docs/results.md`` (the one-shot section) and ``docs/results_oneshot.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

from common import ROOT, THREADS, WORK, run_child, write_results_section

PEER_PY = ROOT / "benchmarks" / ".venv-peer" / "bin" / "python"
N_CALIB, SEQ_LEN, EVAL_WINDOWS = 32, 512, 40
FP32_PEAK_GFLOPS = 170.0  # measured on this machine class, 2 threads


def _ours(methods, patterns, dtype=None, n=None, fraction=None, iterations=None, aux=None):
    return [("sparseforge", m, p, dtype, n, fraction, iterations, aux) for p in patterns for m in methods]


#: the SparseLLM paper's protocol (Tables 1-2): only the first half of the decoder blocks is pruned
HALF = 0.5
TABLE2_PATTERNS = ("0.5", "2:4", "0.7", "0.8", "0.9", "1:4")
HIGH_PATTERNS = ("0.7", "0.8", "0.9", "1:4")
#: the pattern of the SparseLLM iteration curve (perplexity vs time for K = 1..4)
CURVE_PATTERN = "0.8"

# (tool, method, pattern, forward dtype or None, calibration windows or None = 32, block fraction or None = 1,
#  SparseLLM iterations or None = default, SparseLLM aux tokens or None = default (0 = all))
SUITES = {
    # the foundation comparison: three baselines, float32 and bfloat16 forwards, and llm-compressor
    "foundation": [
        *_ours(("magnitude", "wanda", "sparsegpt"), ("0.5", "2:4", "0.7")),
        *_ours(("sparsegpt",), ("0.5", "2:4", "0.7"), "bfloat16"),
        ("sparseforge", "wanda", "0.5", "bfloat16", None, None),
        ("sparseforge", "sparsegpt", "0.5", "b4", None, None),  # memory-lean: micro-batches of 4 windows
        ("sparseforge", "sparsegpt", "0.5", "lowmem", None, None),  # one pass, the FFN intermediate recomputed
        *[("llmcompressor", "sparsegpt", p, None, None, None) for p in ("0.5", "2:4", "0.7")],
        ("llmcompressor", "wanda", "0.5", None, None, None),
    ],
    # SparseLLM against the baselines, shaped like the paper's Table 2 (plus 50% and 2:4)
    # (measured before --aux-tokens existed: SparseLLM's iterations on every calibration token)
    "sparsellm": [c if c[1] != "sparsellm" else c[:7] + (0,)
                  for c in _ours(("magnitude", "wanda", "sparsegpt", "sparsellm"), TABLE2_PATTERNS, fraction=HALF)],
    # the paper's appendix: perplexity vs calibration windows
    "calibration": [c if c[1] != "sparsellm" else c[:7] + (0,)
                    for n in (8, 16, None, 64) for c in _ours(("sparsegpt", "sparsellm"), ("0.7",), None, n, HALF)],
    # SparseLLM at its defaults against SparseGPT on every block, and its iteration curve
    "sparsellm-full": [
        *_ours(("sparsegpt", "sparsellm"), HIGH_PATTERNS),
        *[c for k in (1, 2, 3, 6) for c in _ours(("sparsellm",), (CURVE_PATTERN,), iterations=k)],
        *_ours(("sparsellm",), (CURVE_PATTERN,), iterations=4, aux=0),  # the former default: every token
    ],
}


def run_key(tool, method, pattern, dtype=None, n=None, fraction=None, iterations=None, aux=None):
    return (f"{tool}:{method}:{pattern}" + (f":{dtype}" if dtype else "") + (f":n{n}" if n else "")
            + (f":f{fraction}" if fraction else "") + (f":k{iterations}" if iterations is not None else "")
            + (f":t{aux}" if aux is not None else ""))


def parse_key(key):
    """Optional fields after the pattern: a forward dtype, "bK" (micro-batches of K windows,
    two passes) or "lowmem" (one pass with --low-memory), "nN" (calibration windows), "fX" (fraction of the blocks pruned, from the first),
    "kK" (SparseLLM iterations), "tT" (SparseLLM aux tokens, 0 = all)."""
    match = re.match(r"^([\w-]+):([\w-]+):(\d+:\d+|[\d.]+|-)(?::(.*))?$", key)
    tool, method, pattern, tail = match.groups()
    rest = tail.split(":") if tail else []

    def field(prefix, cast):
        return next((cast(r[1:]) for r in rest if r.startswith(prefix) and r[1:2].isdigit()), None)

    n, fraction, iterations, aux = field("n", int), field("f", float), field("k", int), field("t", int)
    dtype = next((r for r in rest if not (r[:1] in "nfkt" and r[1:2].isdigit())), None)
    return tool, method, pattern, dtype, n, fraction, iterations, aux


# ---------------------------------------------------------------- workers (run in child processes)

def _setup_torch():
    import torch

    torch.set_num_threads(THREADS)
    return torch


def worker_prepare(out: Path) -> None:
    """Calibration and evaluation windows, and the dense model directory, once."""
    _setup_torch()
    import torch

    from sparseforge import load_model
    from sparseforge.assets import embedded_model_gguf
    from sparseforge.data import fingerprint, load_windows
    from sparseforge.loading import gguf_to_directory

    model_dir = gguf_to_directory(embedded_model_gguf())
    _, tokenizer = load_model(model_dir)
    calib = load_windows(tokenizer, "wiki", "train", SEQ_LEN, n=N_CALIB, seed=0)
    evalw = load_windows(tokenizer, "wiki", "eval", SEQ_LEN, n=EVAL_WINDOWS)
    torch.save(calib, out / "calib.pt")
    for n in (8, 16, 32, 64):  # the calibration-size study: nested draws of the same seed
        torch.save(load_windows(tokenizer, "wiki", "train", SEQ_LEN, n=n, seed=0), out / f"calib{n}.pt")
    torch.save(evalw, out / "eval.pt")
    (out / "prepare.json").write_text(json.dumps({
        "model_dir": str(model_dir), "calib_fingerprint": fingerprint(calib), "eval_fingerprint": fingerprint(evalw),
        "n_calib": N_CALIB, "seq_len": SEQ_LEN, "eval_windows": int(evalw.shape[0]),
    }))


def forward_flops(model, n_tokens: int, seq_len: int, passes: int, method: str, fraction: float = 1.0) -> float:
    """FLOPs of the calibration work on the pruned blocks (the engine stops after the last one):
    block forwards, Hessian products, SparseGPT updates."""
    from sparseforge.models import get_adapter, get_weight

    adapter = get_adapter(model)
    cfg = model.config
    total = 0.0
    for block in adapter.blocks[: math.ceil(fraction * len(adapter.blocks))]:
        linears = adapter.block_linears(block)
        params = sum(get_weight(m).numel() for m in linears.values())
        attn = 4 * n_tokens * seq_len * cfg.num_attention_heads * getattr(cfg, "head_dim", 64)
        total += passes * (2 * n_tokens * params + attn)
        if method == "sparsegpt":
            for group in adapter.linear_groups:
                w = [get_weight(linears[n]) for n in group]
                cols = w[0].shape[1]
                rows = sum(x.shape[0] for x in w)
                total += 2 * n_tokens * cols * cols + rows * cols * cols + 128 * rows * cols
    return total


def worker_run(out: Path, key: str) -> None:
    """Prune (ours) or load the peer's result, then evaluate on the shared windows."""
    torch = _setup_torch()
    from sparseforge import load_model, prune
    from sparseforge.eval import perplexity
    from sparseforge.measure import peak_rss_mb

    prep = json.loads((out / "prepare.json").read_text())
    tool, method, pattern, dtype, n_calib, fraction, iterations, aux = parse_key(key)
    batch_size = int(dtype[1:]) if dtype and re.fullmatch(r"b\d+", dtype) else None
    low_memory = dtype == "lowmem"
    dtype = None if batch_size or low_memory else dtype
    result = {"key": key, "tool": tool, "method": method, "pattern": pattern, "compute_dtype": dtype or "float32",
              "n_calib": n_calib or N_CALIB, "batch_size": batch_size, "low_memory": low_memory,
              "block_fraction": fraction or 1.0}
    sparsellm_options = {}
    if method == "sparsellm":
        from sparseforge.oneshot.engine import OneShotConfig

        defaults = OneShotConfig(method="sparsellm")
        sparsellm_options = {"iterations": defaults.iterations if iterations is None else iterations,
                             "aux_tokens": defaults.aux_tokens if aux is None else aux}
        result.update(sparsellm_options)
    if tool == "dense":
        model, _ = load_model(prep["model_dir"])
        result.update(sparsity=0.0, prune_seconds=0.0, peak_rss_mb=peak_rss_mb())
    elif tool == "sparseforge":
        model, _ = load_model(prep["model_dir"])
        calib = torch.load(out / ("calib.pt" if not n_calib else f"calib{n_calib}.pt"))
        report = prune(model, method=method, pattern=pattern, calibration=calib, compute_dtype=dtype,
                       batch_size=batch_size, low_memory=low_memory, block_fraction=fraction or 1.0, progress=False,
                       **sparsellm_options)
        result.update(sparsity=report.sparsity, prune_seconds=report.seconds, peak_rss_mb=peak_rss_mb())
        if report.details:
            result["ffn_logs"] = report.details
        if method in ("wanda", "sparsegpt"):
            flops = forward_flops(model, calib.numel(), SEQ_LEN, 2 if batch_size else 1, method, fraction or 1.0)
            result.update(tflop=flops / 1e12, gflops_per_s=flops / 1e9 / report.seconds,
                          fraction_of_fp32_peak=flops / 1e9 / report.seconds / FP32_PEAK_GFLOPS)
    else:  # the peer's saved model, pruned in its own process
        peer = json.loads((out / f"{key}.peer.json").read_text())
        model, _ = load_model(out / f"{key}.model")
        from sparseforge.eval.sparsity_report import sparsity_summary

        result.update(sparsity=sparsity_summary(model)["prunable_sparsity"], prune_seconds=peer["oneshot_seconds"],
                      peak_rss_mb=peer["peak_rss_mb"], versions=peer.get("versions"))
    evalw = torch.load(out / "eval.pt")
    result.update(perplexity(model, evalw, progress=False))
    (out / f"{key}.json").write_text(json.dumps(result, indent=2))


# ---------------------------------------------------------------- driver

def run_peer(key: str, method: str, pattern: str) -> None:
    target = ["--pattern", pattern] if ":" in pattern else ["--sparsity", pattern]
    prep = json.loads((WORK / "prepare.json").read_text())
    run_child([str(PEER_PY), "benchmarks/peer_llmcompressor.py", "--model", prep["model_dir"],
               "--windows", str(WORK / "calib.pt"), "--method", method, *target,
               "--output", str(WORK / f"{key}.model"), "--json", str(WORK / f"{key}.peer.json"),
               "--threads", str(THREADS)], WORK / f"{key}.peer.log")


def fmt_table(results: list[dict], dense: dict) -> str:
    peers = {(r["method"], r["pattern"]): r for r in results if r["tool"] == "llmcompressor"}
    lines = [
        "| tool | method | pattern | forward dtype | perplexity | sparsity | prune s | time vs llm-compressor "
        "| peak RSS MiB | GFLOP/s (% of fp32 peak) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
        f"| dense | - | - | float32 | {dense['perplexity']:.2f} | 0 | - | - | {dense['peak_rss_mb']:.0f} | - |",
    ]
    for r in results:
        peer = peers.get((r["method"], r["pattern"]))
        ratio = f"{r['prune_seconds'] / peer['prune_seconds']:.2f}x" if peer and r["tool"] != "llmcompressor" else "-"
        rate = f"{r['gflops_per_s']:.0f} ({100 * r['fraction_of_fp32_peak']:.0f}%)" if "gflops_per_s" in r else "-"
        lines.append(
            f"| {r['tool']} | {r['method']} | {r['pattern']} | {r['compute_dtype']}"
            f"{' (two-pass, batch ' + str(r['batch_size']) + ')' if r.get('batch_size') else ''}"
            f"{' (one pass, --low-memory)' if r.get('low_memory') else ''} | {r['perplexity']:.2f} | "
            f"{r['sparsity']:.4f} | {r['prune_seconds']:.1f} | {ratio} | {r['peak_rss_mb']:.0f} | {rate} |"
        )
    return "\n".join(lines)


def fmt_pivot(results: list[dict], value: str, fmt: str) -> str:
    """Methods as rows, patterns as columns (the paper's Table 2 shape)."""
    patterns = list(dict.fromkeys(r["pattern"] for r in results))
    methods = list(dict.fromkeys(r["method"] for r in results))
    cell = {(r["method"], r["pattern"]): r[value] for r in results}
    lines = ["| method | " + " | ".join(patterns) + " |", "|---|" + "---:|" * len(patterns)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(format(cell[(m, p)], fmt) if (m, p) in cell else "-" for p in patterns) + " |")
    return "\n".join(lines)


def plot_sparsity(results: list[dict], dense: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in results):
        points = sorted((float(r["pattern"]), r["perplexity"]) for r in results
                        if r["method"] == method and ":" not in r["pattern"])
        ax.plot(*zip(*points), marker="o", label=method)
    ax.axhline(dense["perplexity"], color="grey", linestyle="--", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("unstructured sparsity")
    ax.set_ylabel(f"perplexity ({dense['n_windows']} x {dense['seq_len']} held-out wiki tokens)")
    ax.set_title("SmolLM2-135M, one-shot pruning")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _is_default(r: dict) -> bool:
    from sparseforge.oneshot.engine import OneShotConfig

    defaults = OneShotConfig(method="sparsellm")
    return r.get("iterations") == defaults.iterations and r.get("aux_tokens") == defaults.aux_tokens


def fmt_sparsellm_full(results: list[dict], docs: Path) -> str:
    """SparseGPT vs SparseLLM's defaults per pattern, then SparseLLM's time/quality curve over K."""
    sgpt = {r["pattern"]: r for r in results if r["method"] == "sparsegpt"}
    default = {r["pattern"]: r for r in results if r["method"] == "sparsellm" and _is_default(r)}
    example = next(iter(default.values()))
    lines = [f"All 30 blocks pruned. SparseLLM at its defaults: alpha = beta = 5, {example['iterations']} iterations "
             f"on {example['aux_tokens']} of the {N_CALIB * SEQ_LEN} calibration tokens (seeded random subset; "
             "iteration 0 = SparseGPT on every token; the chosen iterate is kept only if it beats SparseGPT on as "
             "many held-out calibration tokens). Forwards in float32 for both.",
             "", "| pattern | SparseGPT perplexity | SparseLLM perplexity | change | SparseGPT s | SparseLLM s "
             "| time ratio (target <= 4x) | SparseLLM peak RSS MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for pattern, r in default.items():
        g = sgpt.get(pattern)
        if g is None:
            continue
        lines.append(f"| {pattern} | {g['perplexity']:.2f} | {r['perplexity']:.2f} | "
                     f"{100 * (r['perplexity'] / g['perplexity'] - 1):+.1f}% | {g['prune_seconds']:.0f} | "
                     f"{r['prune_seconds']:.0f} | {r['prune_seconds'] / g['prune_seconds']:.2f}x | {r['peak_rss_mb']:.0f} |")
    curve = sorted((r for r in results if r["method"] == "sparsellm" and r["pattern"] == CURVE_PATTERN),
                   key=lambda r: (r["aux_tokens"] == 0, r["iterations"]))
    g = sgpt.get(CURVE_PATTERN)
    lines += ["", f"Iterations vs time at {CURVE_PATTERN} (iteration 0 = SparseGPT):", "",
              "| iterations | aux tokens | prune s | x SparseGPT | perplexity | |", "|---:|---:|---:|---:|---:|---|"]
    if g:
        lines.append(f"| 0 | - | {g['prune_seconds']:.0f} | 1.00x | {g['perplexity']:.2f} | SparseGPT |")
    for r in curve:
        tokens = "all" if r["aux_tokens"] == 0 else str(r["aux_tokens"])
        ratio = f"{r['prune_seconds'] / g['prune_seconds']:.2f}x" if g else "-"
        tag = "**default**" if _is_default(r) else ("former default" if r["aux_tokens"] == 0 else "")
        lines.append(f"| {r['iterations']} | {tokens} | {r['prune_seconds']:.0f} | {ratio} | {r['perplexity']:.2f} | {tag} |")
    plot_curve(curve, g, docs / "sparsellm_iterations.png")
    lines += ["", "![perplexity vs pruning time](sparsellm_iterations.png)"]
    return "\n".join(lines)


def plot_curve(curve: list[dict], sgpt: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    subset = [r for r in curve if r["aux_tokens"] != 0]
    points = ([(sgpt["prune_seconds"], sgpt["perplexity"], "0")] if sgpt else []) + [
        (r["prune_seconds"], r["perplexity"], str(r["iterations"])) for r in subset]
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label="SparseLLM, default tokens (K = 0 is SparseGPT)")
    for x, y, k in points:
        ax.annotate(f"K={k}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for r in curve:
        if r["aux_tokens"] == 0:
            ax.plot([r["prune_seconds"]], [r["perplexity"]], marker="s", linestyle="", label=f"K={r['iterations']}, every token")
        if _is_default(r):
            ax.plot([r["prune_seconds"]], [r["perplexity"]], marker="*", markersize=14, linestyle="", label="default")
    if sgpt:
        ax.axvline(4 * sgpt["prune_seconds"], color="grey", linestyle="--", label="4x SparseGPT's time")
    ax.set_xlabel("pruning seconds (all 30 blocks, 2 threads)")
    ax.set_ylabel("perplexity (held-out wiki)")
    ax.set_title(f"SmolLM2-135M at {CURVE_PATTERN}: SparseLLM iterations")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_docs(suite: str, results: list[dict], dense: dict, meta: dict) -> None:
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    (docs / f"results_{suite}.json").write_text(json.dumps({"meta": meta, "dense": dense, "results": results}, indent=2) + "\n")
    setup = (
        f"Machine: {meta['machine']}, {THREADS} threads. Calibration: {N_CALIB} windows x {SEQ_LEN} tokens of the "
        f"wiki train split (seed 0, fingerprint `{meta['calib_fingerprint']}`) unless stated, the same windows for every "
        f"tool. Perplexity: the first {meta['eval_windows']} held-out windows x {SEQ_LEN} tokens (fingerprint "
        f"`{meta['eval_fingerprint']}`), float32; dense {dense['perplexity']:.2f}. Each row is its own process; peak RSS "
        "is that process's maximum resident memory up to the end of pruning (before evaluation). "
        f"Command: `.venv/bin/python benchmarks/oneshot.py --suite {suite}` ({meta['date']}).\n\n"
    )
    if suite == "foundation":
        cpu = meta.get("cpu", {})
        no_bf16 = ("" if cpu.get("native_bf16", True) else
                   f"This CPU ({cpu.get('torch_capability')}) has no native bfloat16, so the rows with bfloat16 forwards "
                   "are left out (emulated bf16 runs ~10x slower than float32). ")
        body = ("## One-shot pruning of SmolLM2-135M: sparseforge vs llm-compressor\n\n" + setup + no_bf16
                + "GFLOP/s counts block forwards, Hessian products and SparseGPT updates over the pruning wall time.\n\n"
                + fmt_table(results, dense))
    elif suite == "sparsellm":
        plot_sparsity(results, dense, docs / "sparsellm_perplexity.png")
        body = ("## SparseLLM vs the layer-wise baselines (SmolLM2-135M)\n\n" + setup
                + "As in the paper's Tables 1-2, only the first half of the decoder blocks (15 of 30) is pruned, "
                "for every method. SparseLLM: alpha = beta = 5, 4 iterations on every calibration token "
                "(`--aux-tokens 0`; the default since 2026-12-06 runs them on a 3072-token subset, see "
                "\"SparseLLM at its defaults\" below).\n\n"
                + "Perplexity (lower is better):\n\n" + fmt_pivot(results, "perplexity", ".2f")
                + "\n\nPruning seconds:\n\n" + fmt_pivot(results, "prune_seconds", ".0f")
                + "\n\nSparseLLM's pruning time over SparseGPT's: " + ", ".join(
                    f"{r['pattern']} {r['prune_seconds'] / g['prune_seconds']:.1f}x" for r in results for g in results
                    if r["method"] == "sparsellm" and g["method"] == "sparsegpt" and r["pattern"] == g["pattern"])
                + "\n\nPeak RSS (MiB):\n\n" + fmt_pivot(results, "peak_rss_mb", ".0f")
                + "\n\n![perplexity vs sparsity](sparsellm_perplexity.png)")
    elif suite == "sparsellm-full":
        body = "## SparseLLM at its defaults on every block (SmolLM2-135M)\n\n" + setup + fmt_sparsellm_full(results, docs)
    else:
        rows = ["| calibration windows | " + " | ".join(dict.fromkeys(r["method"] for r in results)) + " |"]
        rows.append("|---:|" + "---:|" * (len(rows[0].split("|")) - 3))
        for n in sorted({r["n_calib"] for r in results}):
            rows.append(f"| {n} | " + " | ".join(f"{r['perplexity']:.2f}" for r in results if r["n_calib"] == n) + " |")
        body = ("## Perplexity vs calibration size at 70% (SmolLM2-135M)\n\n" + setup
                + "First half of the blocks pruned (the paper's protocol); calibration windows drawn with the same "
                "seed from the train split. SparseLLM's iterations on every calibration token (`--aux-tokens 0`).\n\n" + "\n".join(rows))
    write_results_section(suite, body)


def _matches(only: str, key: str) -> bool:
    return key.endswith(only[:-1]) if only.endswith("$") else only in key


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="foundation")
    parser.add_argument("--only", action="append", default=[],
                        help="run only keys containing this, e.g. sparsegpt:0.5; end it with $ to match the key's end "
                             "(sparseforge:sparsegpt:0.5$ leaves out the bfloat16 and b4 variants)")
    parser.add_argument("--no-peer", action="store_true", help="skip llm-compressor")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs from a previous invocation")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.worker[0] == "prepare":
            worker_prepare(WORK)
        else:
            worker_run(WORK, args.worker[1])
        return 0

    WORK.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, str(Path(__file__).resolve())]
    if not (args.reuse and (WORK / "prepare.json").exists()):
        run_child(me + ["--worker", "prepare"], WORK / "prepare.log")
    meta = json.loads((WORK / "prepare.json").read_text())
    peer_ok = PEER_PY.exists() and not args.no_peer
    if not peer_ok and not args.no_peer and args.suite == "foundation":
        print("llm-compressor venv missing: run `make bench-peer` to compare with it; skipping the peer", flush=True)
    configs = [c for c in SUITES[args.suite]
               if (c[0] != "llmcompressor" or peer_ok) and (not args.only or any(_matches(o, run_key(*c)) for o in args.only))]
    from sparseforge.hardware import cpu_features

    cpu = cpu_features()
    if not cpu["native_bf16"]:
        skipped = [run_key(*c) for c in configs if c[3] == "bfloat16"]
        if skipped:
            print(f"this CPU has no native bfloat16 (emulated: ~10x slower than float32): skipping {', '.join(skipped)}",
                  flush=True)
        configs = [c for c in configs if c[3] != "bfloat16"]
    results, dense = [], None
    for config in [("dense", "-", "-")] + configs:
        key = run_key(*config)
        done = WORK / f"{key}.json"
        if not (args.reuse and done.exists()):
            started = time.perf_counter()
            if config[0] == "llmcompressor":
                run_peer(key, config[1], config[2])
            run_child(me + ["--worker", "run", key], WORK / f"{key}.log")
            print(f"{key}: done in {time.perf_counter() - started:.0f}s", flush=True)
        r = json.loads(done.read_text())
        print(f"  {key}: perplexity {r['perplexity']:.2f}  sparsity {r['sparsity']:.4f}  prune {r['prune_seconds']:.1f}s  "
              f"peak RSS {r['peak_rss_mb']:.0f} MiB", flush=True)
        if config[0] == "dense":
            dense = r
        else:
            results.append(r)
    meta.update(machine=f"{platform.machine()} {os.cpu_count()} cores", date=time.strftime("%Y-%m-%d"), cpu=cpu)
    if not args.only:
        write_docs(args.suite, results, dense, meta)
    print(fmt_table(results, dense))
    return 0


if __name__ == "__main__":
    sys.exit(main())
