#!/usr/bin/env python
"""Training cost of SPP vs LoRA* at equal trainable parameters: step time and memory.

    .venv/bin/python benchmarks/adapter_cost.py            # 8 steps per method and allocator, 4 x 512 tokens, bf16

On the recovery benchmark's Wanda-50% SmolLM2-135M (it prunes it if missing),
each method runs in its own process: ``finetune`` for a few steps on the wiki
train split (the same batches), then one more step under the profiler. Three
numbers per method:

- median step time;
- peak RSS of the process (what the OS sees; includes what the C allocator keeps
  after tensors are freed) and whether training set it;
- peak of live tensor memory during one step above its start, from the
  profiler's allocation events (what the method itself needs: saved
  activations, temporaries, gradients), independent of the allocator.

Results: printed, docs/results_adapter_cost.json, and the adapter-cost section
of docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from common import ROOT, THREADS, WORK, run_child, write_results_section

METHODS = ("spp", "lora-star")
#: C allocator settings compared. glibc's default raises its mmap threshold as large blocks are
#: freed, after which freed tensors stay in the heap (resident) instead of going back to the OS;
#: a fixed threshold returns every block over it on free, so the process's RSS follows live memory.
ALLOCATORS = {"glibc default": {}, "fixed mmap threshold (128 KiB)": {"MALLOC_MMAP_THRESHOLD_": "131072"}}
PRUNED = WORK / "pruned-wanda-0.5"


def live_peak_mb(step) -> float:
    """Peak of live CPU tensor memory while ``step()`` runs, above what was live at its start (MiB)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def worker(method: str, args) -> None:
    import torch

    torch.set_num_threads(THREADS)
    from sparseforge import load_model
    from sparseforge.recovery import finetune

    model, tokenizer = load_model(PRUNED)
    report = finetune(model, tokenizer, method=method, data="wiki", steps=args.steps, seq_len=args.seq_len,
                      evaluate=False, progress=False, batch_size=args.batch_size, mixed_precision=args.mixed_precision,
                      seed=0)
    # one more step, unmerged and profiled: a fresh injection on the merged model, same shapes
    from sparseforge.peft import AdapterConfig, inject_adapters

    inject_adapters(model, AdapterConfig(method=method))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, len(tokenizer), (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))
    model.train()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16"):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer state exists from here on, as in every step after the first
    result = {"method": method, "trainable": report.trainable["trainable"], "per_mille": report.trainable["per_mille"],
              "steps": args.steps, "median_step_seconds": report.median_step_seconds,
              "step_seconds": [round(h["seconds"], 3) for h in report.history],
              "peak_rss_mb": report.peak_rss_mb, "training_peak_rss_mb": report.training_peak_rss_mb,
              "rss_per_step_mb": [h["rss_mb"] for h in report.history],
              "live_peak_step_mb": round(live_peak_mb(step), 1)}
    (WORK / f"cost-{method}-{args.tag}.json").write_text(json.dumps(result, indent=2))


def write_docs(results: dict, meta: dict) -> None:
    docs = ROOT / "docs"
    (docs / "results_adapter_cost.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    lines = ["| C allocator | method | trainable (per mille) | median step s | peak RSS MiB | live tensor peak of a step MiB |",
             "|---|---|---:|---:|---:|---:|"]
    ratios = []
    for allocator, by_method in results.items():
        for method, name in (("spp", "SPP"), ("lora-star", "LoRA*")):
            r = by_method[method]
            lines.append(f"| {allocator} | {name} | {r['trainable']:,} ({r['per_mille']:.2f}) | "
                         f"{r['median_step_seconds']:.2f} | {r['peak_rss_mb']:.0f} | {r['live_peak_step_mb']:.0f} |")
        s, lo = by_method["spp"], by_method["lora-star"]
        ratios.append(f"{allocator}: step time {s['median_step_seconds'] / lo['median_step_seconds']:.2f}x, peak RSS "
                      f"{s['peak_rss_mb'] - lo['peak_rss_mb']:+.0f} MiB, live tensor peak "
                      f"{s['live_peak_step_mb'] - lo['live_peak_step_mb']:+.0f} MiB")
    body = (
        "## Training cost: SPP vs LoRA* (SmolLM2-135M, Wanda 50%)\n\n"
        f"Machine: {meta['machine']}, {THREADS} threads; {meta['steps']} steps of {meta['batch_size']} x "
        f"{meta['seq_len']} tokens, {meta['mixed_precision']}, every block linear adapted, LoRA's rank matched to "
        "SPP's parameters; each method in its own process, under two settings of the C allocator. Peak RSS is the "
        "process's (training sets it: loading and data preparation peak lower); the live tensor peak is the most "
        "tensor memory alive at once during one step, above the step's start, from the profiler's allocation "
        "events: what the method itself needs, whatever the allocator keeps. "
        f"Command: `.venv/bin/python benchmarks/adapter_cost.py` ({meta['date']}).\n\n"
        + "\n".join(lines) + "\n\nSPP relative to LoRA*: " + "; ".join(ratios) + "."
    )
    write_results_section("adapter-cost", body)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--mixed-precision", default="bf16")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--tag", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args)
        return 0
    if not PRUNED.exists():
        run_child([sys.executable, str(ROOT / "benchmarks" / "recovery.py"), "--worker", "prune", "wanda", "0.5"],
                  WORK / "pruned-wanda-0.5.log")
    shared = ["--steps", args.steps, "--batch-size", args.batch_size, "--seq-len", args.seq_len,
              "--mixed-precision", args.mixed_precision]
    results = {}
    for index, (allocator, env) in enumerate(ALLOCATORS.items()):
        results[allocator] = {}
        for method in METHODS:
            started = time.perf_counter()
            run_child([sys.executable, str(Path(__file__).resolve()), "--worker", method, "--tag", index] + shared,
                      WORK / f"cost-{method}-{index}.log", env=env)
            results[allocator][method] = r = json.loads((WORK / f"cost-{method}-{index}.json").read_text())
            print(f"{allocator}: {method}: median step {r['median_step_seconds']:.2f}s, peak RSS {r['peak_rss_mb']:.0f} MiB "
                  f"(before training {r['training_peak_rss_mb']['before']:.0f}), live tensor peak of a step "
                  f"{r['live_peak_step_mb']:.0f} MiB ({time.perf_counter() - started:.0f}s)", flush=True)
    meta = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
            "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "mixed_precision": args.mixed_precision}
    write_docs(results, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
