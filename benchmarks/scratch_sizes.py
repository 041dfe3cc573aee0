#!/usr/bin/env python
"""Does the larger model learn faster on this corpus? The scratch suite's dense model against its small dense model
under several training settings.

    .venv/bin/python benchmarks/scratch_sizes.py            # every setting, reusing stored runs
    .venv/bin/python benchmarks/scratch_sizes.py --docs-only

TranSpa's from-scratch claim (beat a dense model trained at the final size) rests on a premise: the larger model,
trained on the same tokens, ends better than the small one, so that a pruned large model has a lead to keep. This
script checks that premise on the wiki train split (~1.08M tokens) with the scratch suite's models
(benchmarks/transpa.py: hidden 256, 4 layers, 8 heads / 4 KV heads, FFN 768; the small one 6 heads / 3 KV heads,
FFN 422, the size TranSpa ends at) over the learning rate and the initialisation. Every run sees
the same tokens per setting, seed 0, float32, 2 threads; perplexity on the scratch suite's 100 held-out windows.
Each run is its own process; JSON under benchmarks/work/scratch_sizes/, the table in docs/results.md and
docs/results_scratch_sizes.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from common import ROOT, THREADS, WORK, run_child, write_results_section

OUT = WORK / "scratch_sizes"
#: (learning rate, initialisation, batch size, steps): 200 steps of 16 sequences of 256 tokens, 819k tokens
SETTINGS = [(3e-4, "transformers", 16, 200), (1e-3, "transformers", 16, 200), (3e-3, "transformers", 16, 200),
            (3e-3, "gpt2-scaled-residual", 16, 200)]
MODELS = ("dense", "small")


def run_name(setting: tuple, model: str) -> str:
    lr, init, batch, steps = setting
    return f"{model}-lr{lr:g}-{init}-b{batch}x{steps}"


def planned() -> list[tuple[tuple, str, str]]:
    """(setting, model, run name) of every run, in the order they run."""
    return [(setting, model, run_name(setting, model)) for setting in SETTINGS for model in MODELS]


def worker(name: str) -> None:
    import logging

    import torch
    import transpa

    from sparseforge.training import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(THREADS)
    setting, model_name = next((s, m) for s, m, n in planned() if n == name)
    lr, init, batch, steps = setting
    base = transpa.settings("scratch")
    fields = dict(base["model"])
    if model_name == "small":
        fields.update(num_attention_heads=6, num_key_value_heads=3, head_dim=32, intermediate_size=422)
    tokenizer = transpa.wiki_tokenizer()
    model = transpa.scratch_model(fields, tokenizer, scaled_init=init == "gpt2-scaled-residual")
    started = time.perf_counter()
    report = train(model, tokenizer, method="dense", task="lm", data="wiki", seq_len=base["seq_len"],
                   eval_windows=base["eval_windows"], eval_batch_size=base["eval_batch_size"], progress=False,
                   eval_every=steps // 5, steps=steps, batch_size=batch, lr=lr, weight_decay=base["weight_decay"],
                   warmup=base["warmup"], seed=0).to_dict()
    run = report["run"]
    result = {"name": name, "model": model_name, "lr": lr, "init": init, "batch_size": batch, "steps": steps,
              "seq_len": base["seq_len"], "model_fields": fields,
              "block_parameters": transpa.llama_block_parameters(fields),
              "perplexity": run["metrics_after"]["perplexity"],
              "curve": [(e["step"], e["perplexity"]) for e in run["evaluations"]],
              "train_seconds": run["train_seconds"], "total_seconds": round(time.perf_counter() - started, 1)}
    (OUT / f"{name}.json").write_text(json.dumps(result, indent=1))


def stored() -> dict[str, dict]:
    return {name: json.loads((OUT / f"{name}.json").read_text()) for _, _, name in planned()
            if (OUT / f"{name}.json").exists()}


def write_docs(runs: dict[str, dict]) -> None:
    lines = ["## Does the larger model learn faster here? (`benchmarks/scratch_sizes.py`)", "",
             "The scratch suite's dense model (3.15M block parameters) against the small dense model TranSpa's "
             "60% target ends at (6 heads / 3 KV heads, FFN 422: 1.89M), trained from scratch on the same 819,200 "
             "wiki tokens (0.76 epochs) per setting; lr cosine with 5% warm-up, weight decay 0.1, seed 0, float32. "
             "Held-out perplexity on the scratch suite's 100 windows of 256 tokens.", "",
             "| lr | init | batch x steps | dense | small dense | small vs dense |", "|---:|---|---|---:|---:|---:|"]
    payload = []
    for setting in SETTINGS:
        pair = [runs.get(run_name(setting, m)) for m in MODELS]
        if not all(pair):
            continue
        dense, small = (r["perplexity"] for r in pair)
        lr, init, batch, steps = setting
        lines.append(f"| {lr:g} | {init} | {batch} x {steps} | {dense:.2f} | {small:.2f} | {small / dense - 1:+.1%} |")
        payload.append({"lr": lr, "init": init, "batch_size": batch, "steps": steps, "dense": pair[0],
                        "small": pair[1]})
    if not payload:
        return
    wins = sum(p["small"]["perplexity"] < p["dense"]["perplexity"] for p in payload)
    lines += ["", f"The small model ends lower in {wins} of {len(payload)} settings."]
    write_results_section("scratch-sizes", "\n".join(lines))
    (ROOT / "docs" / "results_scratch_sizes.json").write_text(json.dumps(payload, indent=1) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs-only", action="store_true", help="rebuild the table from stored runs")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.docs_only:
        for _, _, name in planned():
            if (OUT / f"{name}.json").exists():
                continue
            print(name, flush=True)
            started = time.perf_counter()
            run_child([sys.executable, __file__, "--worker", name], OUT / f"{name}.log")
            print(f"  done in {time.perf_counter() - started:.0f}s", flush=True)
    write_docs(stored())


if __name__ == "__main__":
    main()
