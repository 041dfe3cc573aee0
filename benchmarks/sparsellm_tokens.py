#!/usr/bin/env python
"""SparseLLM per FFN: output error and time vs the tokens its iterations run on, and K.

    .venv/bin/python benchmarks/sparsellm_tokens.py

Captures the FFN inputs of two SmolLM2-135M blocks on the benchmark's calibration
windows (32 x 512 tokens of the wiki train split, seed 0; the dense model's
activations), then prunes each FFN alone with SparseLLM at 90% for every
(aux tokens, K) setting and reports its output error ‖Y − FFN(X)‖²/‖Y‖² on all
16,384 tokens and its time, one process, settings interleaved per block. The
numbers back the choice of the default ``--aux-tokens`` (docs/sparsellm.md);
they are written to docs/results_sparsellm_tokens.json.
"""

from __future__ import annotations

import json
import os
import platform
import time

import torch
from common import ROOT, THREADS

BLOCKS = (0, 14)
PATTERN = "0.9"
#: (tokens in iterations 1..K, 0 = all; K)
SETTINGS = ((0, 2), (0, 4), (4096, 4), (3072, 4), (2048, 4), (2048, 6))


def capture(model, windows, blocks):
    """The inputs of each block's FFN on the windows (dense model), (tokens x hidden)."""
    store = {b: [] for b in blocks}
    hooks = [model.model.layers[b].mlp.register_forward_pre_hook(
        lambda m, a, b=b: store[b].append(a[0].detach().reshape(-1, a[0].shape[-1]).clone())) for b in blocks]
    with torch.no_grad():
        for batch in windows.split(4):
            model(input_ids=batch, use_cache=False)
    for h in hooks:
        h.remove()
    return {b: torch.cat(store[b]) for b in blocks}


def main() -> int:
    torch.set_num_threads(THREADS)
    from sparseforge import load_model
    from sparseforge.assets import embedded_model_gguf
    from sparseforge.data import load_windows
    from sparseforge.hardware import cpu_features
    from sparseforge.loading import gguf_to_directory
    from sparseforge.oneshot.sparsellm import FFNProblem, sparsellm_ffn
    from sparseforge.sparsity.pattern import Pattern

    model, tokenizer = load_model(gguf_to_directory(embedded_model_gguf()))
    windows = load_windows(tokenizer, "wiki", "train", 512, n=32, seed=0)
    inputs = capture(model, windows, BLOCKS)
    pattern = Pattern.parse(PATTERN)
    patterns = {n: pattern for n in ("gate", "up", "down")}
    rows = []
    for b in BLOCKS:
        mlp = model.model.layers[b].mlp
        weights = {n: getattr(mlp, f"{n}_proj").weight.detach().float() for n in ("gate", "up", "down")}
        problem = FFNProblem("silu_gated", inputs[b], weights)
        y = problem.output(weights)

        def error(w, problem=problem, y=y):
            return float((problem.output(w) - y).square().sum() / y.square().sum())

        sparsellm_ffn(problem, patterns, alpha=5, beta=5, iterations=1, aux_tokens=2048)  # compile once
        sparsegpt = sparsellm_ffn(problem, patterns, alpha=5, beta=5, iterations=0)
        sparsegpt_error = error(sparsegpt.weights)
        rows.append({"block": b, "aux_tokens": None, "iterations": 0, "seconds": None, "error": sparsegpt_error})
        for aux, k in SETTINGS:
            start = time.perf_counter()
            result = sparsellm_ffn(problem, patterns, alpha=5, beta=5, iterations=k, aux_tokens=aux)
            rows.append({"block": b, "aux_tokens": aux or len(inputs[b]), "iterations": k,
                         "seconds": time.perf_counter() - start, "error": error(result.weights)})
            print(f"block {b}: tokens {rows[-1]['aux_tokens']:>6} K {k}: {rows[-1]['seconds']:5.2f} s, "
                  f"output error {rows[-1]['error']:.4f} (SparseGPT {sparsegpt_error:.4f})",
                  flush=True)
    meta = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "cpu": cpu_features(), "threads": THREADS,
            "pattern": PATTERN, "tokens": int(len(inputs[BLOCKS[0]])), "date": time.strftime("%Y-%m-%d")}
    (ROOT / "docs" / "results_sparsellm_tokens.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
