#!/usr/bin/env python
"""How much one TranSpa round's removals hurt a pretrained model before any recovery.

    .venv/bin/python benchmarks/transpa_damage.py            # the embedded SmolLM2-135M
    .venv/bin/python benchmarks/transpa_damage.py --windows 16

TranSpa's round removes, in each selected couple, the units with the smallest coupled L1
product up to 1 - θ of the couple's mass (θ = 0.9), and the uniform layout removes whole
KV groups. This measures the held-out perplexity right after such removals (no training),
for both unit scores (``l1``: the paper's coupled L1 product; ``activation``: the measured
contribution, statistics from --calib training windows): the θ-rule units of every couple
of one kind (QK, VO, FFN) in every layer; with --per-layer, the FFN θ-rule units of one
layer at a time (the layers that hurt most); and whole KV group g in every layer (the
uniform layout's step).
A removal the method treats as "10% of the mass" that multiplies perplexity shows where a
unit score misleads on a pretrained model.

Results: printed, and benchmarks/work/transpa_damage.json (docs/transpa.md quotes them).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

from common import THREADS, WORK


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=8, help="held-out wiki windows (default 8)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--theta", type=float, default=0.9)
    parser.add_argument("--calib", type=int, default=8, help="training windows for the activation statistics (default 8)")
    parser.add_argument("--per-layer", action="store_true",
                        help="also each layer's FFN θ-rule units alone (60 more evaluations, ~15 min)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(THREADS)
    from sparseforge import load_model
    from sparseforge.data import load_windows
    from sparseforge.eval.perplexity import perplexity
    from sparseforge.structured.activations import ActivationStats
    from sparseforge.structured.couples import build_couples
    from sparseforge.structured.importance import unit_scores
    from sparseforge.structured.select import RemovalPlan, theta_rule
    from sparseforge.structured.surgery import apply_plan

    started = time.perf_counter()
    model, tokenizer = load_model(None)
    windows = load_windows(tokenizer, "wiki", "eval", args.seq_len, n=args.windows)
    couples = build_couples(model)
    stats = ActivationStats(training_only=False)
    stats.attach(model)
    with torch.no_grad():
        for window in load_windows(tokenizer, "wiki", "train", args.seq_len, n=args.calib):
            model(window[None])
    stats.detach()
    scorers = {"l1": unit_scores, "activation": stats.unit_scores}
    theta_units = {score: {c.name: theta_rule(scorer(model, c), args.theta).tolist() for c in couples}
                   for score, scorer in scorers.items()}

    def ppl_without(units: dict) -> float:
        shrunk = copy.deepcopy(model)
        apply_plan(shrunk, RemovalPlan.from_units(units, layout="free"), None, "free")
        return round(perplexity(shrunk, windows, progress=False)["perplexity"], 2)

    result = {"model": "embedded SmolLM2-135M", "windows": args.windows, "seq_len": args.seq_len, "theta": args.theta,
              "calib_windows": args.calib, "dense": round(perplexity(model, windows, progress=False)["perplexity"], 2),
              "kinds": {}, "ffn_layers": {}, "kv_groups": {}}
    for score in scorers:
        result["kinds"][score] = {}
        for kind in ("qk", "vo", "ffn"):
            units = {c.name: theta_units[score][c.name] for c in couples if c.kind == kind}
            total = sum(c.units for c in couples if c.kind == kind)
            result["kinds"][score][kind] = {"units_removed": sum(map(len, units.values())), "units": total,
                                            "perplexity": ppl_without(units)}
            print(score, kind, result["kinds"][score][kind], flush=True)
        if args.per_layer:
            result["ffn_layers"][score] = [
                {"couple": c.name, "units_removed": len(theta_units[score][c.name]),
                 "perplexity": ppl_without({c.name: theta_units[score][c.name]})} for c in couples if c.kind == "ffn"]
    groups = sorted({c.group for c in couples if c.kind == "vo"})
    for g in groups:
        units = {c.name: list(range(c.units)) for c in couples if c.group == g and c.kind in ("qk", "vo")}
        result["kv_groups"][g] = ppl_without(units)
    result["seconds"] = round(time.perf_counter() - started, 1)

    print(f"\nperplexity on {args.windows} held-out wiki windows of {args.seq_len} tokens; dense {result['dense']}")
    print(f"θ-rule units (θ {args.theta}) of every couple of one kind, all layers:")
    for score, kinds in result["kinds"].items():
        for kind, r in kinds.items():
            print(f"  {score:10s} {kind:4s} {r['units_removed']:6d} of {r['units']:6d} units -> {r['perplexity']}")
    for score, layers in result["ffn_layers"].items():  # empty without --per-layer
        worst = sorted(layers, key=lambda r: -r["perplexity"])[:5]
        print(f"FFN θ-rule units ({score}) of one layer alone, the five worst:")
        for r in worst:
            print(f"  {r['couple']:22s} {r['units_removed']:4d} units -> {r['perplexity']}")
    print("whole KV group g removed in every layer: " + ", ".join(f"g{g} -> {p}" for g, p in result["kv_groups"].items()))
    assert all(math.isfinite(r["perplexity"]) for layers in result["ffn_layers"].values() for r in layers)
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "transpa_damage.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {WORK / 'transpa_damage.json'} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
