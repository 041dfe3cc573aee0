#!/usr/bin/env python
"""LoSparse benchmark: LoSparse vs ITP vs low-rank vs dense fine-tuning, quality, size and speed.

    .venv/bin/python benchmarks/losparse.py                  # both suites, reusing stored runs
    .venv/bin/python benchmarks/losparse.py --suite encoder  # MiniLM on wiki-topics only
    .venv/bin/python benchmarks/losparse.py --suite lm       # SmolLM2 language modelling only
    .venv/bin/python benchmarks/losparse.py --fresh          # rerun everything
    .venv/bin/python benchmarks/losparse.py --suite encoder --lr 1e-4   # the learning-rate check (see LR_CHECK)

encoder: the embedded MiniLM-L6 fine-tuned on the built-in wiki-topics task
(11 classes, first 128 tokens) — dense fine-tuning, and LoSparse, ITP and
low-rank at keep 20%, 15% and 10% of the block linears' weights — with the
same steps, batch, learning rate and seed; accuracy and macro-F1 on the
held-out split; compact parameters and bytes; training time; then the
compact LoSparse-15% model's inference throughput against the dense model's,
measured interleaved in one process (batch 32 x 128 tokens).

lm: SmolLM2-135M on the wiki train split at keep 50% of the block linears:
LoSparse vs ITP vs low-rank after the same tokens; perplexity on the 40
held-out windows of 512 tokens; compact prefill speed against dense.

Each run is its own process (its peak RSS is its own) and stores its JSON
under benchmarks/work/losparse/; the tables (docs/results.md, losparse
section), docs/results_losparse.json and docs/losparse_accuracy.png are built
from every stored run with the same settings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from common import ROOT, THREADS, WORK, run_child, write_results_section

OUT = WORK / "losparse"
KEEPS = (0.2, 0.15, 0.1)
ENCODER = {"steps": 120, "batch_size": 16, "seq_len": 128, "lr": 5e-4, "weight_decay": 0.01, "warmup": 0.06}
#: every encoder run is repeated at this rate (stored under lr1e-4/), so each method gets the same two-rate
#: search: 1e-4 suits low-rank fine-tuning, 5e-4 the others at this budget (docs/losparse.md)
LR_CHECK = 1e-4
LM = {"steps": 24, "batch_size": 4, "seq_len": 256, "lr": 1e-4, "weight_decay": 0.01, "warmup": 0.06, "keep": 0.5}


def run_name(suite: str, method: str, keep: float | None) -> str:
    return f"{suite}-{method}" + ("" if keep is None else f"-{keep:g}")


def settings(suite: str, lr: float | None = None) -> dict:
    s = ENCODER if suite == "encoder" else LM
    return s if lr is None else {**s, "lr": lr}


def run_dir(lr: float | None = None):
    """Where the runs at ``lr`` are stored (None: the suite's own rate)."""
    return OUT if lr is None else OUT / ("lr" + format(lr, ".0e").replace("e-0", "e-"))  # e.g. lr1e-4


# ---------------------------------------------------------------- one run (child process)


def worker(suite: str, method: str, keep: float | None, lr: float | None = None) -> None:
    import logging

    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    torch.set_num_threads(THREADS)
    from sparseforge import load_model, save
    from sparseforge.models.modules import structure_manifest
    from sparseforge.training import train

    s = settings(suite, lr)
    out = run_dir(lr)
    options = {} if method == "dense" else {"keep": keep}
    train_options = dict(steps=s["steps"], batch_size=s["batch_size"], lr=s["lr"], weight_decay=s["weight_decay"],
                         warmup=s["warmup"], seed=0)
    started = time.perf_counter()
    if suite == "encoder":
        from sparseforge.train.labelled import classification_splits

        splits = classification_splits("wiki-topics")
        torch.manual_seed(0)
        model, tokenizer = load_model("encoder", task="classify", label_names=splits[2].names)
        # no evaluation before training: the new head scores chance
        report = train(model, tokenizer, method=method, task="classify", data=splits, seq_len=s["seq_len"],
                       method_options=options, progress=False, evaluate_before=False, **train_options)
    else:
        model, tokenizer = load_model(None)
        report = train(model, tokenizer, method=method, task="lm", data="wiki", seq_len=s["seq_len"], eval_windows=40,
                       method_options=options, progress=False, **train_options)
        # perplexity at the one-shot benchmarks' protocol: 40 held-out windows of 512 tokens
        from sparseforge import evaluate

        report.run["metrics_after_512"] = evaluate(model, tokenizer, data="wiki", seq_len=512, progress=False)
    result = report.to_dict()
    result.update(suite=suite, keep=keep, settings=s, total_seconds=round(time.perf_counter() - started, 1))
    if method == "losparse" and keep in (0.15, 0.5) and lr is None:  # the model whose speed is measured
        save(model, tokenizer, out / f"{run_name(suite, method, keep)}.model", overwrite=True,
             metadata={"structure": structure_manifest(model)})
    (out / f"{run_name(suite, method, keep)}.json").write_text(json.dumps(result, indent=2))


def speed_worker(suite: str) -> None:
    import torch

    torch.set_num_threads(THREADS)
    from sparseforge import load_model
    from sparseforge.eval.speed import SpeedConfig, benchmark_speed, format_speed_table

    keep = 0.15 if suite == "encoder" else 0.5
    compact_dir = OUT / f"{run_name(suite, 'losparse', keep)}.model"
    if suite == "encoder":
        dense, _ = load_model("encoder", task="classify", num_labels=11)
        config = SpeedConfig(prefill_tokens=128, batch_size=32, repeats=7, warmup=2, threads=THREADS)
    else:
        dense, _ = load_model(None)
        config = SpeedConfig(prefill_tokens=512, decode_tokens=32, context=512, repeats=5, warmup=1, threads=THREADS)
    compact, _ = load_model(compact_dir)
    result = benchmark_speed([("dense", dense), (f"LoSparse keep {keep:g}", compact)], config, progress=False)
    print(format_speed_table(result))
    (OUT / f"speed-{suite}.json").write_text(json.dumps(result, indent=2, default=str))


# ---------------------------------------------------------------- driver and tables


def planned(suite: str) -> list[tuple[str, float | None]]:
    if suite == "encoder":
        return [("dense", None)] + [(m, k) for k in KEEPS for m in ("losparse", "itp", "lowrank")]
    return [(m, LM["keep"]) for m in ("losparse", "itp", "lowrank")]


def stored(suite: str, lr: float | None = None) -> dict:
    runs = {}
    for method, keep in planned(suite):
        path = run_dir(lr) / f"{run_name(suite, method, keep)}.json"
        if path.exists():
            run = json.loads(path.read_text())
            if run.get("settings") == settings(suite, lr):
                runs[(method, keep)] = run
    return runs


def encoder_table(runs: dict, speed: dict | None) -> tuple[str, dict]:
    s = ENCODER
    dense = runs.get(("dense", None))
    lines = [f"MiniLM-L6 (all-MiniLM-L6-v2) on wiki-topics: 11 classes, {dense['run']['data']['train_examples'] if dense else '?'} "
             f"training / {dense['run']['data']['eval_examples'] if dense else '?'} held-out articles, first {s['seq_len']} tokens; "
             f"{s['steps']} steps x {s['batch_size']} examples, lr {s['lr']:g} (cosine, {s['warmup']:.0%} warm-up), "
             "weight decay 0.01, seed 0, float32; LoSparse rank ratio 5%, cubic schedule t_i = 10%, t_f = 30% of the steps.",
             "", "| method | keep | accuracy | macro-F1 | block-linear weights kept | model parameters | model MiB | train s "
             "| peak RSS MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (method, keep), run in sorted(runs.items(), key=lambda kv: (-(kv[0][1] or 1), kv[0][0])):
        after = run["run"]["metrics_after"]
        target = run["method_report"].get("target_parameters")
        kept = f"{target['compact']:,} ({target['kept_fraction']:.1%})" if target else "all"
        lines.append(f"| {method} | {'-' if keep is None else f'{keep:.0%}'} | {after['accuracy']:.4f} | {after['macro_f1']:.4f} | "
                     f"{kept} | {run['size_after']['parameters']:,} | {run['size_after']['bytes'] / 2**20:.1f} | "
                     f"{run['run']['train_seconds']:.0f} | {run['run']['peak_rss_mb']:.0f} |")
    verdict = _verdict(runs)
    lines += ["", "Targets (accuracy points): " + ", ".join(f"{k} = {v:+.2f}" for k, v in verdict.items())]
    if speed:
        lines += ["", _speed_lines(speed)]
    return "\n".join(lines), verdict


def _verdict(runs: dict) -> dict:
    """The issue's comparisons, in accuracy points: LoSparse minus ITP and minus low-rank per keep, dense minus LoSparse 20%."""
    acc = {k: r["run"]["metrics_after"]["accuracy"] for k, r in runs.items()}
    verdict = {}
    for keep in KEEPS:
        for other in ("itp", "lowrank"):
            if ("losparse", keep) in acc and (other, keep) in acc:
                verdict[f"losparse_minus_{other}_{keep:g}"] = round(100 * (acc[("losparse", keep)] - acc[(other, keep)]), 2)
    if ("dense", None) in acc and ("losparse", 0.2) in acc:
        verdict["dense_minus_losparse_0.2"] = round(100 * (acc[("dense", None)] - acc[("losparse", 0.2)]), 2)
    return verdict


def lr_check_table(runs: dict, check: dict) -> tuple[str, dict]:
    """Accuracy at the suite's rate and at LR_CHECK, and the comparison on each method's better rate
    (every method gets the same two-rate search)."""
    main_lr = ENCODER["lr"]
    lines = [f"The same grid at lr {LR_CHECK:g} (everything else equal), and each method at the better of the two "
             "rates:", "", f"| method | keep | accuracy, lr {main_lr:g} | accuracy, lr {LR_CHECK:g} | better rate "
             "| its accuracy | its macro-F1 |", "|---|---:|---:|---:|---:|---:|---:|"]
    best = {}
    for key in planned("encoder"):
        pair = {lr: r for lr, r in ((main_lr, runs.get(key)), (LR_CHECK, check.get(key))) if r}
        if not pair:
            continue
        lr, top = max(pair.items(), key=lambda kv: kv[1]["run"]["metrics_after"]["accuracy"])
        best[key] = top
        cell = {rate: f"{r['run']['metrics_after']['accuracy']:.4f}" for rate, r in pair.items()}
        method, keep = key
        lines.append(f"| {method} | {'-' if keep is None else f'{keep:.0%}'} | {cell.get(main_lr, '-')} | "
                     f"{cell.get(LR_CHECK, '-')} | {lr:g} | {top['run']['metrics_after']['accuracy']:.4f} | "
                     f"{top['run']['metrics_after']['macro_f1']:.4f} |")
    verdict = _verdict(best)
    lines += ["", "Targets on the better rates (accuracy points): "
              + ", ".join(f"{k} = {v:+.2f}" for k, v in verdict.items())]
    return "\n".join(lines), verdict


def _speed_lines(speed: dict) -> str:
    machine = speed["machine"]
    rows = ["| model | parameters | MiB | tokens/s (prefill) | speed-up | decode tokens/s | decode speed-up |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for m in speed["models"]:
        decode = "-" if m["decode_tokens_per_s"] is None else f"{m['decode_tokens_per_s']:.1f}"
        decode_x = "-" if m.get("speedup_decode") is None else f"{m['speedup_decode']:.2f}x"
        rows.append(f"| {m['label']} | {m['parameters']:,} | {m['bytes'] / 2**20:.1f} | {m['prefill_tokens_per_s']:.0f} | "
                    f"{m['speedup_prefill']:.2f}x | {decode} | {decode_x} |")
    c = speed["config"]
    head = (f"Inference speed, interleaved in one process ({c['repeats']} rounds after {c['warmup']} warm-up, medians; "
            f"batch {c['batch_size']} x {c['prefill_tokens']} tokens; {c['threads']} threads; float32; "
            f"CPU {machine.get('model_name')}, flags {', '.join(machine.get('flags', []))}; "
            f"load average before {speed.get('load_average', {}).get('before', '?')}):")
    return head + "\n\n" + "\n".join(rows)


def lm_table(runs: dict, speed: dict | None) -> str:
    s = LM
    lines = [f"SmolLM2-135M, wiki language modelling, keep {s['keep']:.0%} of the block linears' weights; "
             f"{s['steps']} steps x {s['batch_size']} x {s['seq_len']} tokens = {s['steps'] * s['batch_size'] * s['seq_len']:,} "
             f"training tokens, lr {s['lr']:g}, float32. Perplexity on the 40 held-out windows of 512 tokens (dense: see the "
             "one-shot tables, 14.10).", "",
             "| method | perplexity | block-linear weights kept | model parameters | model MiB | train s | peak RSS MiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for (method, _keep), run in sorted(runs.items()):
        target = run["method_report"]["target_parameters"]
        lines.append(f"| {method} | {run['run']['metrics_after_512']['perplexity']:.2f} | {target['compact']:,} "
                     f"({target['kept_fraction']:.1%}) | {run['size_after']['parameters']:,} | "
                     f"{run['size_after']['bytes'] / 2**20:.1f} | {run['run']['train_seconds']:.0f} | {run['run']['peak_rss_mb']:.0f} |")
    if speed:
        lines += ["", _speed_lines(speed)]
    return "\n".join(lines)


def plot(runs: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in ("losparse", "itp", "lowrank"):
        points = sorted((k, r["run"]["metrics_after"]["accuracy"]) for (m, k), r in runs.items() if m == method)
        if points:
            ax.plot([100 * k for k, _ in points], [100 * a for _, a in points], marker="o", label=method)
    if ("dense", None) in runs:
        ax.axhline(100 * runs[("dense", None)]["run"]["metrics_after"]["accuracy"], color="grey", ls="--", label="dense")
    ax.set_xlabel("block-linear weights kept (%)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("MiniLM-L6 on wiki-topics")
    ax.legend()
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "losparse_accuracy.png", dpi=110)


def build_docs() -> None:
    sections, payload = [], {}
    enc = stored("encoder")
    speed_enc = json.loads((OUT / "speed-encoder.json").read_text()) if (OUT / "speed-encoder.json").exists() else None
    if enc:
        text, verdict = encoder_table(enc, speed_enc)
        check = stored("encoder", LR_CHECK)
        payload["encoder"] = {"settings": ENCODER, "runs": {run_name("encoder", m, k): r for (m, k), r in enc.items()},
                              "verdict": verdict, "speed": speed_enc}
        if check:
            check_text, check_verdict = lr_check_table(enc, check)
            text += "\n\n" + check_text
            payload["encoder_lr_check"] = {"settings": settings("encoder", LR_CHECK), "verdict_best_rate": check_verdict,
                                           "runs": {run_name("encoder", m, k): r for (m, k), r in check.items()}}
        sections.append("### MiniLM on wiki-topics\n\n" + text)
        plot(enc)
    lm = stored("lm")
    speed_lm = json.loads((OUT / "speed-lm.json").read_text()) if (OUT / "speed-lm.json").exists() else None
    if lm:
        sections.append("### SmolLM2 language modelling\n\n" + lm_table(lm, speed_lm))
        payload["lm"] = {"settings": LM, "runs": {run_name("lm", m, k): r for (m, k), r in lm.items()}, "speed": speed_lm}
    if not sections:
        return
    for suite in payload.values():  # histories are long; the JSON keeps the final numbers and the loss curve every 10 steps
        for run in suite["runs"].values():
            run["run"]["history"] = run["run"]["history"][::10]
    write_results_section("losparse", "## LoSparse, ITP and low-rank during fine-tuning (`benchmarks/losparse.py`)\n\n"
                          + "\n\n".join(sections) + "\n\nPlot: [losparse_accuracy.png](losparse_accuracy.png).")
    (ROOT / "docs" / "results_losparse.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["encoder", "lm", "all"], default="all")
    parser.add_argument("--fresh", action="store_true", help="rerun stored runs too")
    parser.add_argument("--docs-only", action="store_true", help="rebuild the tables from stored runs")
    parser.add_argument("--lr", type=float, help=f"run the grid at this rate instead, stored apart (e.g. {LR_CHECK:g})")
    parser.add_argument("--worker", nargs=3, metavar=("SUITE", "METHOD", "KEEP"), help=argparse.SUPPRESS)
    parser.add_argument("--speed-worker", metavar="SUITE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.worker:
        suite, method, keep = args.worker
        worker(suite, method, None if keep == "-" else float(keep), args.lr)
        return
    if args.speed_worker:
        speed_worker(args.speed_worker)
        return
    suites = ["encoder", "lm"] if args.suite == "all" else [args.suite]
    lr = None if args.lr is None or args.lr == ENCODER["lr"] else args.lr
    for suite in suites if not args.docs_only else []:
        have = {} if args.fresh else stored(suite, lr)
        run_dir(lr).mkdir(parents=True, exist_ok=True)
        for method, keep in planned(suite):
            if (method, keep) in have:
                continue
            print(f"{suite} {method} {keep}" + ("" if lr is None else f" lr {lr:g}"), flush=True)
            started = time.perf_counter()
            run_child([sys.executable, __file__, "--worker", suite, method, "-" if keep is None else keep]
                      + ([] if lr is None else ["--lr", str(lr)]), run_dir(lr) / f"{run_name(suite, method, keep)}.log")
            print(f"  done in {time.perf_counter() - started:.0f}s", flush=True)
        if lr is None and (args.fresh or not (OUT / f"speed-{suite}.json").exists()):
            run_child([sys.executable, __file__, "--speed-worker", suite], OUT / f"speed-{suite}.log")
        build_docs()
    build_docs()


if __name__ == "__main__":
    main()
