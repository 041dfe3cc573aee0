#!/usr/bin/env python
"""Sparse checkpoints on disk: file size and load time of --save-format sparse-bitmask against dense.

    .venv/bin/python benchmarks/sparse_format.py               # 50% and 2:4, bfloat16 and float32, 3 loads each
    .venv/bin/python benchmarks/sparse_format.py --repeats 5 --patterns 0.5

The embedded SmolLM2-135M is pruned by magnitude (no calibration: the layout's size depends only on
where the zeros are) at each pattern, in each dtype, and saved twice: dense and sparse-bitmask (the
packed 2:4 layout is chosen for 2:4). For each pair: the weight file sizes and their ratio, the whole
directories, the save times, and the load times of ``sparseforge.load_model`` (median and min of
``--repeats`` loads in this process, after one unmeasured load of each so that imports and the page
cache are warm for both), and a check that the sparse directory reloads bit-exact. Memory after
loading is dense in both cases (the weights are decompressed); the bytes of the loaded parameters
are reported to show it.

Expected from the layout (16-bit, 50%): the block linears take 0.5 (values) + 1/16 (mask) + 4/576
(row offsets; 4/1536 for down_proj) of their dense bytes; with the dense embeddings (21% of the
parameters) the file is ~0.66x.

Results: printed and benchmarks/work/sparse_format.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

from common import ROOT, THREADS, WORK

sys.path.insert(0, str(ROOT / "src"))

OUT = WORK / "sparse_format"


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def weight_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def timed_loads(path: Path, dtype: str, repeats: int) -> list[float]:
    from sparseforge import load_model

    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        model, _ = load_model(path, dtype=dtype)
        seconds.append(time.perf_counter() - started)
        del model
    return seconds


def same_weights(a, b) -> bool:
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    return sorted(sa) == sorted(sb) and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def run_case(pattern: str, dtype: str, repeats: int) -> dict:
    from sparseforge import load_model, prune, read_metadata, save

    model, tokenizer = load_model(None, dtype=dtype)
    report = prune(model, tokenizer, method="magnitude", pattern=pattern, progress=False)
    case = {"pattern": pattern, "dtype": dtype, "sparsity": round(report.sparsity, 6)}
    paths = {}
    for fmt in ("dense", "sparse-bitmask"):
        path = OUT / f"{pattern.replace(':', 'of')}-{dtype}-{fmt}"
        started = time.perf_counter()
        save(model, tokenizer, path, overwrite=True, save_format=fmt)
        case[fmt] = {"save_seconds": round(time.perf_counter() - started, 3), "weight_bytes": weight_bytes(path),
                     "directory_bytes": directory_bytes(path)}
        paths[fmt] = path
    case["layout"] = read_metadata(paths["sparse-bitmask"])["save_format"]["format"]
    reloaded, _ = load_model(paths["sparse-bitmask"], dtype=dtype)
    case["bit_exact"] = same_weights(model, reloaded)
    case["loaded_parameter_bytes"] = sum(p.numel() * p.element_size() for p in reloaded.parameters())
    del reloaded, model
    timed_loads(paths["dense"], dtype, 1)  # warm: imports, page cache
    for fmt, path in paths.items():
        seconds = timed_loads(path, dtype, repeats)
        case[fmt].update(load_seconds_median=round(statistics.median(seconds), 3), load_seconds_min=round(min(seconds), 3))
    case["weight_ratio"] = round(case["sparse-bitmask"]["weight_bytes"] / case["dense"]["weight_bytes"], 4)
    case["directory_ratio"] = round(case["sparse-bitmask"]["directory_bytes"] / case["dense"]["directory_bytes"], 4)
    case["load_time_ratio"] = round(case["sparse-bitmask"]["load_seconds_median"] / case["dense"]["load_seconds_median"], 3)
    return case


def table(cases: list[dict]) -> str:
    lines = ["| pattern | dtype | layout | dense file | sparse file | ratio | load dense | load sparse | bit-exact |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        d, s = c["dense"], c["sparse-bitmask"]
        lines.append(f"| {c['pattern']} | {c['dtype']} | {c['layout']} | {d['weight_bytes'] / 2**20:.1f} MiB | "
                     f"{s['weight_bytes'] / 2**20:.1f} MiB | {c['weight_ratio']:.3f}x | {d['load_seconds_median']:.2f} s | "
                     f"{s['load_seconds_median']:.2f} s | {'yes' if c['bit_exact'] else 'NO'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--patterns", nargs="+", default=["0.5", "2:4"])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--repeats", type=int, default=3, help="measured loads per directory (default 3)")
    parser.add_argument("--keep", action="store_true", help=f"keep the saved directories under {OUT}")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(THREADS)
    OUT.mkdir(parents=True, exist_ok=True)
    cases = []
    for dtype in args.dtypes:
        for pattern in args.patterns:
            print(f"{pattern} {dtype} ...", flush=True)
            cases.append(run_case(pattern, dtype, args.repeats))
            print(table(cases[-1:]).splitlines()[-1], flush=True)
    result = {"model": "embedded:SmolLM2-135M-Instruct", "method": "magnitude", "threads": THREADS,
              "repeats": args.repeats, "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "cases": cases,
              "note": "memory after loading is dense: the compressed weights are decompressed on load"}
    print(table(cases))
    path = WORK / "sparse_format.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    if not args.keep:
        shutil.rmtree(OUT, ignore_errors=True)


if __name__ == "__main__":
    main()
