#!/usr/bin/env python
"""Recovery fine-tuning benchmark on SmolLM2-135M: SPP vs LoRA* after one-shot pruning.

    .venv/bin/python benchmarks/recovery.py                      # the full grid
    .venv/bin/python benchmarks/recovery.py --only wanda:0.5     # one pruned model, both methods
    .venv/bin/python benchmarks/recovery.py --reuse --only wanda:0.75 --lr-spp 0.012 0.036 --lr-lora 0.003
                                                    # a learning-rate check beside the defaults' runs
    .venv/bin/python benchmarks/recovery.py --steps 48 --batch-size 2   # the grid at a smaller budget

For each pruning (Wanda and SparseGPT at 50%, 2:4, 75% and 2:8; the one-shot
benchmark's 32 x 512 calibration windows) the pruned model is fine-tuned with
SPP and with LoRA* for the same steps on the same batches of the wiki train
split, with LoRA's rank matched to SPP's trainable parameters. Each run is its
own process (its peak RSS is its own). Perplexity is measured on the one-shot
benchmark's 40 held-out windows. Training runs in bf16 autocast where the
CPU has native bf16 and in float32 elsewhere (``--mixed-precision auto``, the
CLI's default). Results: docs/results.md (section ``recovery``, or
``recovery-STEPSxBATCHxLEN`` for another budget, ``-fp32`` added when not in
bf16: see ``section_suffix``), docs/results_recovery*.json,
docs/recovery_loss*.png. The table is built from every stored run with the
same steps, batch and precision: the methods' default learning rates in the
main table, every learning rate in the learning-rate check below it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

from common import ROOT, THREADS, WORK, run_child, write_results_section

from sparseforge.hardware import autocast_mixed_precision, cpu_features
from sparseforge.methods import default_lr

PRUNINGS = [(m, p) for m in ("wanda", "sparsegpt") for p in ("0.5", "2:4", "0.75", "2:8")]
METHODS = ("spp", "lora-star")
#: steps, batch size, sequence length of the main table (64 x 4 x 512 = 131k training tokens)
DEFAULT_BUDGET = (64, 4, 512)


def _torch():
    import torch

    torch.set_num_threads(THREADS)
    return torch


def worker_prune(method: str, pattern: str) -> None:
    torch = _torch()
    from sparseforge import load_model, prune, save
    from sparseforge.eval import perplexity
    from sparseforge.measure import peak_rss_mb

    prep = json.loads((WORK / "prepare.json").read_text())
    model, tokenizer = load_model(prep["model_dir"])
    report = prune(model, method=method, pattern=pattern, calibration=torch.load(WORK / "calib.pt"), progress=False)
    result = {"prune_method": method, "pattern": pattern, "sparsity": report.sparsity,
              "prune_seconds": report.seconds, "peak_rss_mb": peak_rss_mb()}
    result.update(perplexity(model, torch.load(WORK / "eval.pt"), progress=False))
    save(model, tokenizer, WORK / f"pruned-{method}-{pattern}", metadata={"pruning": report.to_dict()}, overwrite=True)
    (WORK / f"pruned-{method}-{pattern}.json").write_text(json.dumps(result, indent=2))


def worker_finetune(method: str, pattern: str, ft: str, lr: float, args) -> None:
    torch = _torch()
    from sparseforge import load_model
    from sparseforge.eval import perplexity
    from sparseforge.recovery import finetune

    model, tokenizer = load_model(WORK / f"pruned-{method}-{pattern}")
    options = dict(batch_size=args.batch_size, grad_accum=1, mixed_precision=args.mixed_precision, seed=0,
                   weight_decay=1e-3, warmup=0.03)
    report = finetune(model, tokenizer, method=ft, data="wiki", steps=args.steps, seq_len=args.seq_len,
                      evaluate=False, progress=False, lr=lr, **options)
    result = report.to_dict()
    result.update(prune_method=method, prune_pattern=pattern)
    result["perplexity"] = perplexity(model, torch.load(WORK / "eval.pt"), progress=False)
    run_path(method, pattern, ft, lr, args).write_text(json.dumps(result, indent=2))


def learning_rates(ft: str, args) -> list[float]:
    """The rates to run ``ft`` at: those asked for (--lr-spp / --lr-lora), else the method's default."""
    return args.lr.get(ft) or [default_lr(ft)]


def budget_name(args) -> str:
    return f"{args.steps}x{args.batch_size}x{args.seq_len}-{args.mixed_precision}"


def run_path(method: str, pattern: str, ft: str, lr: float, args, suffix: str = ".json") -> Path:
    """Where a fine-tuning run's result lives; the learning rate and the budget are part of the name, so a
    learning-rate check or another budget adds runs beside the defaults' instead of replacing them."""
    return WORK / f"ft-{method}-{pattern}-{ft}-lr{lr:g}-{budget_name(args)}{suffix}"


def same_budget(run: dict, args) -> bool:
    """Whether a stored fine-tuning run used the steps, batch, length and precision asked for now."""
    config = run["train_config"]
    return (config["steps"], config["batch_size"], run["data"]["seq_len"], config["mixed_precision"]) == \
        (args.steps, args.batch_size, args.seq_len, args.mixed_precision)


def recovered_fraction(dense: float, pruned: float, tuned: float) -> float:
    """Share of the perplexity lost to pruning that fine-tuning won back: (pruned - tuned) / (pruned - dense)."""
    lost = pruned - dense
    return (pruned - tuned) / lost if lost > 0 else float("nan")


def section_suffix(args) -> str:
    """The benchmark's budget in bf16 (where it was first run) keeps the plain names; another budget or
    precision gets its own section, JSON and plot, so runs of one never replace the other's table."""
    suffix = "" if (args.steps, args.batch_size, args.seq_len) == DEFAULT_BUDGET else \
        f"-{args.steps}x{args.batch_size}x{args.seq_len}"
    if args.mixed_precision != "bf16":
        suffix += "-fp32" if args.mixed_precision == "no" else f"-{args.mixed_precision}"
    return suffix


def write_docs(rows: list[dict], sweep: list[dict], dense: dict, meta: dict, args) -> None:
    docs = ROOT / "docs"
    suffix = section_suffix(args)
    (docs / f"results_recovery{suffix}.json").write_text(
        json.dumps({"meta": meta, "dense": dense, "rows": rows, "learning_rate_check": sweep}, indent=2) + "\n")
    lines = [
        "| pruning | pattern | pruned ppl | +SPP ppl | +LoRA* ppl | SPP recovered | LoRA* recovered "
        "| trainable SPP / LoRA* (per mille) | step s SPP / LoRA* | peak RSS MiB SPP / LoRA* |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s, lo = r["spp"], r["lora-star"]
        lines.append(
            f"| {r['prune_method']} | {r['pattern']} | {r['pruned']:.2f} | {s['perplexity']:.2f} | {lo['perplexity']:.2f} | "
            f"{100 * r['recovered']['spp']:.0f}% | {100 * r['recovered']['lora-star']:.0f}% | "
            f"{s['trainable']:,} / {lo['trainable']:,} ({s['per_mille']:.2f} / {lo['per_mille']:.2f}) | "
            f"{s['step_seconds']:.2f} / {lo['step_seconds']:.2f} | {s['peak_rss_mb']:.0f} / {lo['peak_rss_mb']:.0f} |")
    plot_losses(rows, docs / f"recovery_loss{suffix}.png")
    lines += ["", "Against the targets (computed from the rows above):", ""] + [f"- {v}" for v in verdicts(rows)]
    if sweep:
        lines += ["", "Learning-rate check (same budget and batches; `--lr-spp` / `--lr-lora` with `--only`):", "",
                  "| pruning | pattern | method | lr | pruned ppl | perplexity | recovered | measured |",
                  "|---|---|---|---:|---:|---:|---:|---|"]
        lines += [f"| {s['prune_method']} | {s['pattern']} | {s['method']} | {s['lr']:g} | {s['pruned']:.2f} | "
                  f"{s['perplexity']:.2f} | {100 * s['recovered']:.0f}% | {s['measured']['date']} |"
                  for s in sorted(sweep, key=lambda s: (s["prune_method"], s["pattern"], s["method"], s["lr"]))]
    other_budget = (args.steps, args.batch_size, args.seq_len) != DEFAULT_BUDGET
    flags = "" if not other_budget else f" --steps {args.steps} --batch-size {args.batch_size} --seq-len {args.seq_len}"
    title = "" if not other_budget else f", {args.steps} steps of {args.batch_size} x {args.seq_len} tokens"
    if args.mixed_precision != "bf16":
        title += ", float32" if args.mixed_precision == "no" else f", {args.mixed_precision}"
        flags += f" --mixed-precision {args.mixed_precision}"
    missing = [f"{m} {p}" for m, p in PRUNINGS if not any(r["prune_method"] == m and r["pattern"] == p for r in rows)]
    when = measured_when(rows)
    body = (
        f"## Recovery fine-tuning: SPP vs LoRA* (SmolLM2-135M{title})\n\n"
        f"Machine: {meta['machine']}, {THREADS} threads. Each pruned model is fine-tuned for {meta['steps']} steps of "
        f"{meta['batch_size']} x {meta['seq_len']} tokens ({meta['tokens']:,} training tokens) of the wiki train split, "
        f"the same batches for both methods, AdamW, 3% warm-up then cosine decay, weight decay 1e-3, "
        f"mixed precision {meta['mixed_precision']}, learning rates {meta['lr']}. LoRA's rank is matched to SPP's "
        "trainable parameters (r = 16 row blocks). Perplexity on the one-shot benchmark's held-out windows; dense "
        f"{dense['perplexity']:.2f}. Recovered = (pruned − tuned) / (pruned − dense) perplexity. Both merged "
        "models keep the pruned zero pattern bit for bit (checked in every run). "
        f"Command: `.venv/bin/python benchmarks/recovery.py{flags}` ({when}). "
        + (f"Not run yet with these settings: {', '.join(missing)}.\n\n" if missing else "\n\n")
        + "\n".join(lines) + f"\n\n![training loss](recovery_loss{suffix}.png)"
    )
    write_results_section(f"recovery{suffix}", body)


def measured_when(rows: list[dict]) -> str:
    """The date of the table's runs, or, when rows come from several runs, which rows ran when and where."""
    def key(r: dict) -> tuple:
        m = r["measured"]
        return m["date"], m["cpu"] or "", m["native_bf16"]

    runs = sorted({key(r) for r in rows})
    if len(runs) == 1:
        return runs[0][0]
    parts = []
    for date, cpu, bf16 in runs:
        names = ", ".join(f"{r['prune_method']} {r['pattern']}" for r in rows if key(r) == (date, cpu, bf16))
        where = f"{cpu}, {'native bf16' if bf16 else 'no native bf16'}" if cpu else "CPU not recorded"
        parts.append(f"{names} on {date}, {where}")
    return "; ".join(parts)


def verdicts(rows: list[dict]) -> list[str]:
    """The issue's targets, checked row by row."""
    def listing(selected, fmt):
        return "; ".join(f"{r['prune_method']} {r['pattern']}: {fmt(r)}" for r in selected) or "no rows run"

    half = [r for r in rows if r["pattern"] in ("0.5", "2:4")]
    high = [r for r in rows if r["pattern"] in ("0.75", "2:8")]
    out = [
        f"SPP recovers at least half of the loss at 50% and 2:4 — {sum(r['recovered']['spp'] >= 0.5 for r in half)} "
        f"of {len(half)} rows: " + listing(half, lambda r: f"{100 * r['recovered']['spp']:.0f}%"),
        f"SPP beats LoRA* at 75% — {sum(r['spp']['perplexity'] < r['lora-star']['perplexity'] for r in high)} of "
        f"{len(high)} rows (75% and 2:8): " + listing(high, lambda r: f"{r['spp']['perplexity']:.2f} vs "
                                                       f"{r['lora-star']['perplexity']:.2f}"),
    ]
    if rows:
        ratios = [r["spp"]["step_seconds"] / r["lora-star"]["step_seconds"] for r in rows]
        extra = [r["spp"]["peak_rss_mb"] - r["lora-star"]["peak_rss_mb"] for r in rows]
        out += [f"SPP step time within 1.3x of LoRA*'s — {sum(x <= 1.3 for x in ratios)} of {len(rows)} rows "
                f"(ratio {min(ratios):.2f}–{max(ratios):.2f})",
                f"SPP peak memory no higher than LoRA*'s — {sum(x <= 0 for x in extra)} of {len(rows)} rows "
                f"(SPP − LoRA*: {min(extra):+.0f} to {max(extra):+.0f} MiB)"]
    return out


def plot_losses(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(4, len(rows))
    grid_rows = math.ceil(len(rows) / columns)
    fig, axes = plt.subplots(grid_rows, columns, figsize=(3.2 * columns, 2.8 * grid_rows), sharey=True, squeeze=False)
    for ax in axes.flat[len(rows):]:
        ax.set_visible(False)
    for ax, r in zip(axes.flat, rows):
        for ft in METHODS:
            losses = r[ft]["losses"]
            window = max(1, len(losses) // 20)
            smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                      for i in range(len(losses))]
            ax.plot(range(1, len(losses) + 1), smooth, label=ft)
        ax.set_title(f"{r['prune_method']} {r['pattern']}", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("training loss (smoothed)")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="run only prunings like 'wanda:0.5'")
    parser.add_argument("--steps", type=int, default=DEFAULT_BUDGET[0], help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BUDGET[1])
    parser.add_argument("--seq-len", type=int, default=DEFAULT_BUDGET[2])
    parser.add_argument("--mixed-precision", default="auto",
                        help="auto (bf16 where the CPU has it natively, else float32), no, bf16")
    parser.add_argument("--lr-spp", type=float, nargs="+", default=None, help="SPP learning rates to run")
    parser.add_argument("--lr-lora", type=float, nargs="+", default=None, help="LoRA* learning rates to run")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs from a previous invocation")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.mixed_precision = autocast_mixed_precision(args.mixed_precision)  # the stored runs name what ran
    args.lr = {"spp": args.lr_spp, "lora-star": args.lr_lora}
    if args.worker:
        kind, method, pattern, *rest = args.worker
        if kind == "prune":
            worker_prune(method, pattern)
        else:
            worker_finetune(method, pattern, rest[0], float(rest[1]), args)
        return 0
    if not (WORK / "prepare.json").exists():
        raise SystemExit("run `benchmarks/oneshot.py --suite foundation --only dense` first: it prepares the windows")
    me = [sys.executable, str(Path(__file__).resolve())]
    shared = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
              "--mixed-precision", args.mixed_precision]
    dense = json.loads((WORK / "dense:-:-.json").read_text())
    for method, pattern in PRUNINGS:
        if args.only and f"{method}:{pattern}" not in args.only:
            continue
        done = WORK / f"pruned-{method}-{pattern}.json"
        if not (args.reuse and done.exists()):
            run_child(me + ["--worker", "prune", method, pattern], WORK / f"pruned-{method}-{pattern}.log")
        pruned = json.loads(done.read_text())
        for ft in METHODS:
            for lr in learning_rates(ft, args):
                out = run_path(method, pattern, ft, lr, args)
                if not (args.reuse and out.exists()):
                    started = time.perf_counter()
                    run_child(me + ["--worker", "finetune", method, pattern, ft, repr(lr)] + shared,
                              run_path(method, pattern, ft, lr, args, ".log"))
                    print(f"{method}:{pattern}:{ft} lr {lr:g} done in {time.perf_counter() - started:.0f}s", flush=True)
                r = json.loads(out.read_text())
                if not r["pattern"]["identical"]:
                    raise SystemExit(f"{ft} changed the zero pattern of {method}:{pattern}")
                tuned = r["perplexity"]["perplexity"]
                print(f"  {method}:{pattern}:{ft} lr {lr:g}: pruned {pruned['perplexity']:.2f} -> {tuned:.2f} "
                      f"(recovered {100 * recovered_fraction(dense['perplexity'], pruned['perplexity'], tuned):.0f}%), "
                      f"step {r['median_step_seconds']:.2f}s, peak RSS {r['peak_rss_mb']:.0f} MiB", flush=True)
    # the docs are rebuilt from every stored run with these settings, whatever this invocation ran
    rows, sweep = collect(dense, args)
    meta = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "cpu": cpu_features(),
            "date": time.strftime("%Y-%m-%d"), "steps": args.steps, "batch_size": args.batch_size,
            "seq_len": args.seq_len, "tokens": args.steps * args.batch_size * args.seq_len,
            "mixed_precision": args.mixed_precision, "lr": {ft: default_lr(ft) for ft in METHODS}}
    rows, sweep = carry_over(rows, sweep, meta, ROOT / "docs" / f"results_recovery{section_suffix(args)}.json")
    if rows:
        write_docs(rows, sweep, dense, meta, args)
    return 0


def carry_over(rows: list[dict], sweep: list[dict], meta: dict, stored: Path) -> tuple[list[dict], list[dict]]:
    """Keep the published rows whose runs are not in benchmarks/work (another machine ran them, and the
    work folder does not travel), so a run of one row adds to the table instead of shrinking it. Every row
    and every learning-rate run records when and on which CPU it was measured; rows run now replace
    published ones. A replaced row's runs stay in the learning-rate check when they used other rates than
    today's defaults (the grid of earlier defaults is the check's first column, not lost)."""
    now = measured(meta)
    rows = [{**r, "measured": now} for r in rows]
    sweep = [{**s, "measured": now} for s in sweep]
    previous = json.loads(stored.read_text()) if stored.exists() else {"meta": meta, "rows": []}
    then = measured(previous["meta"])
    fresh = {(r["prune_method"], r["pattern"]) for r in rows}
    kept = [{"measured": then, **r} for r in previous["rows"] if (r["prune_method"], r["pattern"]) not in fresh]
    order = {pruning: i for i, pruning in enumerate(PRUNINGS)}
    rows = sorted(rows + kept, key=lambda r: order[(r["prune_method"], r["pattern"])])

    def run_key(s: dict) -> tuple:
        return s["prune_method"], s["pattern"], s["method"], round(s["lr"], 12)

    def default_runs(r: dict) -> list[dict]:
        return [{"prune_method": r["prune_method"], "pattern": r["pattern"], "method": ft, "lr": r[ft]["lr"],
                 "pruned": r["pruned"], "perplexity": r[ft]["perplexity"], "recovered": r["recovered"][ft],
                 "measured": r.get("measured", then)} for ft in METHODS]

    # later entries replace earlier ones with the same pruning, method and rate: published check, then the
    # published rows (earlier defaults), then every run measured now (the defaults' among them)
    runs = {}
    for s in [{"measured": then, **s} for s in previous.get("learning_rate_check", [])] + \
            [s for r in previous["rows"] for s in default_runs(r)] + sweep:
        runs[run_key(s)] = s
    # the check is only worth a table for a pruning with runs at other rates than today's defaults
    checked = {(s["prune_method"], s["pattern"]) for s in runs.values()
               if not math.isclose(s["lr"], default_lr(s["method"]))}
    return rows, [s for s in runs.values() if (s["prune_method"], s["pattern"]) in checked]


def measured(meta: dict) -> dict:
    """When and on which CPU a table's runs were measured (tables written before this was recorded: date only)."""
    cpu = meta.get("cpu", {})
    return {"date": meta["date"], "cpu": cpu.get("model_name"), "native_bf16": cpu.get("native_bf16")}


def collect(dense: dict, args) -> tuple[list[dict], list[dict]]:
    """The table's rows (both methods at their default learning rates) and every run, at any rate, from
    the stored results with this invocation's steps, batch and precision (carry_over picks the check's)."""
    rows, sweep = [], []
    for method, pattern in PRUNINGS:
        done = WORK / f"pruned-{method}-{pattern}.json"
        if not done.exists():
            continue
        pruned = json.loads(done.read_text())["perplexity"]
        row = {"prune_method": method, "pattern": pattern, "pruned": pruned, "recovered": {}}
        for ft in METHODS:
            for path in sorted(WORK.glob(f"ft-{method}-{pattern}-{ft}-lr*.json")):
                r = json.loads(path.read_text())
                lr = r["train_config"]["lr"]
                if not same_budget(r, args):
                    continue  # other steps, batch or precision
                entry = {"perplexity": r["perplexity"]["perplexity"], "trainable": r["trainable"]["trainable"],
                         "per_mille": r["trainable"]["per_mille"], "step_seconds": r["median_step_seconds"],
                         "peak_rss_mb": r["peak_rss_mb"], "train_seconds": r["train_seconds"], "lr": lr,
                         "losses": [h["loss"] for h in r["history"]]}
                recovered = recovered_fraction(dense["perplexity"], pruned, entry["perplexity"])
                sweep.append({"prune_method": method, "pattern": pattern, "method": ft, "lr": lr,
                              "pruned": pruned, "perplexity": entry["perplexity"], "recovered": recovered})
                if math.isclose(lr, default_lr(ft)):
                    row[ft], row["recovered"][ft] = entry, recovered
        if all(ft in row for ft in METHODS):
            rows.append(row)
    return rows, sweep


if __name__ == "__main__":
    sys.exit(main())
