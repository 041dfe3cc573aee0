#!/usr/bin/env python
"""Peer baseline: prune a dense HF causal LM with llm-compressor's one-shot API.

Runs in the separate venv made by ``benchmarks/setup_peer.sh`` (it needs the
transformers release that llmcompressor pins) and never imports sparseforge, so
the benchmark can put llm-compressor next to sparseforge on the same machine,
model and calibration windows::

    benchmarks/.venv-peer/bin/python benchmarks/peer_llmcompressor.py \\
        --model DENSE_HF_DIR --windows calib.pt --method sparsegpt \\
        --sparsity 0.5 --output OUT_DIR --json RESULT.json --threads 2

``calib.pt`` holds a LongTensor of token ids of shape (n, seq_len): each row is
one calibration window, used as is and in file order.

What the run does:

* loads the model in float32 on the CPU;
* runs ``llmcompressor.oneshot`` with ``SparseGPTModifier`` or
  ``WandaPruningModifier`` on the *sequential* pipeline, pruning only the
  Linear layers inside the decoder blocks (not ``lm_head``, not embeddings),
  with llm-compressor's defaults otherwise (SparseGPT: dampening 0.01, block
  size 128);
* ``--pattern N:M`` keeps N of every M consecutive weights along the input
  dimension (2:4 = 50 % zeros).  llm-compressor's ``mask_structure`` "a:b"
  means the opposite: it *prunes* a of every b (``torch.topk(..., a,
  largest=False)`` picks the weights to zero), so N:M is passed on as
  ``mask_structure="{M-N}:{M}"``.  The saved weights are checked to have at
  most N non-zeros in every group of M;
* saves the pruned model as a plain, uncompressed HF directory (dense
  safetensors with zeros, no compressed-tensors config) plus the input's
  tokenizer files, loadable by vanilla ``transformers``;
* writes a JSON record with versions, timings and memory, and the achieved
  sparsity over the pruned Linear layers.  ``oneshot_seconds`` covers the
  ``oneshot`` call alone (tracing, calibration forwards, pruning);
  ``total_seconds`` runs from interpreter start through imports, model load,
  oneshot, saving and the check of the saved weights; ``peak_rss_mb`` is the
  process's ru_maxrss right after oneshot (``peak_rss_mb_at_end`` after
  saving).

How llm-compressor prunes, for comparing results: unstructured SparseGPT
picks its mask per block of ``block_size`` input columns over all rows at once
(threshold at index ``int(rows * cols * sparsity)`` of the sorted scores,
pruning scores ``<=`` it, so at least one weight per block over the target);
unstructured Wanda prunes ``int(in_features * sparsity)`` weights in every
output row; for N:M both pick the pruned weights per group of M consecutive
input columns in every row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path

# Everything is local: never let huggingface_hub reach for the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

T_START = time.perf_counter()

# Files copied verbatim from the input directory so that the output is
# tokenised exactly like the input, whatever transformers release reads it.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)


class UsageError(Exception):
    """An input problem reported as a one-line error."""


def fail(msg: str) -> None:
    print(f"peer_llmcompressor: error: {msg}", file=sys.stderr)
    sys.exit(2)


def peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform == "darwin":
        return rss / (1024 * 1024)
    return rss / 1024


def parse_pattern(text: str) -> tuple[int, int]:
    try:
        n_str, m_str = text.split(":")
        n, m = int(n_str), int(m_str)
    except ValueError:
        raise argparse.ArgumentTypeError(f"pattern must look like N:M, got {text!r}") from None
    if not 0 < n < m:
        raise argparse.ArgumentTypeError(f"pattern N:M needs 0 < N < M, got {text!r}")
    return n, m


def parse_sparsity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"sparsity must be a number, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"sparsity must be in (0, 1), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Prune a dense HF causal LM with llm-compressor (peer baseline).")
    p.add_argument("--model", required=True, help="dense HF model directory")
    p.add_argument(
        "--windows",
        required=True,
        help="torch file with a LongTensor (n, seq_len) of calibration token ids",
    )
    p.add_argument("--method", required=True, choices=("sparsegpt", "wanda"))
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--sparsity", type=parse_sparsity, help="unstructured sparsity, e.g. 0.5")
    target.add_argument(
        "--pattern",
        type=parse_pattern,
        help="N:M semi-structured pattern: keep N of every M weights, e.g. 2:4",
    )
    p.add_argument("--output", required=True, help="directory for the pruned model")
    p.add_argument("--json", required=True, help="path of the result JSON file")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    return p


def check_inputs(args: argparse.Namespace) -> None:
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise UsageError(f"model directory not found: {model_dir}")
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"no config.json in model directory: {model_dir}")
    has_weights = any(model_dir.glob("*.safetensors")) or any(model_dir.glob("*.bin"))
    if not has_weights:
        raise UsageError(f"no *.safetensors or *.bin weights in: {model_dir}")
    if not Path(args.windows).is_file():
        raise UsageError(f"calibration windows file not found: {args.windows}")
    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    out = Path(args.output).resolve()
    if out == model_dir.resolve():
        raise UsageError("--output must differ from --model")
    if Path(args.json).is_dir():
        raise UsageError(f"--json points at a directory: {args.json}")


def load_windows(path: str, vocab_size: int):
    import torch

    try:
        windows = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - reported as one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UsageError(f"cannot read calibration windows {path}: {type(exc).__name__}: {first}") from exc
    if not isinstance(windows, torch.Tensor):
        raise UsageError(f"{path} must hold a tensor of token ids, found {type(windows).__name__}")
    if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 1:
        raise UsageError(f"{path} must hold a 2-D tensor (n, seq_len), found shape {tuple(windows.shape)}")
    if windows.dtype.is_floating_point or windows.dtype == torch.bool:
        raise UsageError(f"{path} must hold integer token ids, found {windows.dtype}")
    windows = windows.to(torch.long).contiguous()
    lo, hi = int(windows.min()), int(windows.max())
    if lo < 0 or hi >= vocab_size:
        raise UsageError(f"token ids in {path} span [{lo}, {hi}], outside the model's vocabulary [0, {vocab_size})")
    return windows


class WindowSet:
    """Map-style dataset: one calibration window per item, in file order."""

    def __init__(self, windows):
        import torch

        self.windows = windows
        self.mask = torch.ones_like(windows[0])

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.windows[i], "attention_mask": self.mask}


class _NoProcessor:
    """Stand-in processor for model directories without a tokenizer.

    oneshot only needs a processor to tokenise text datasets; the windows are
    already token ids and reach it as a DataLoader, so nothing calls this.
    """


def decoder_block_classes(model) -> list[str]:
    """Class names of the transformer blocks (the sequential-pipeline units)."""
    from llmcompressor.utils.pytorch.module import infer_sequential_targets

    classes = list(infer_sequential_targets(model))
    present = {type(m).__name__ for m in model.modules()}
    classes = [c for c in classes if c in present]
    if not classes:
        raise UsageError("cannot tell the decoder block class of this model (model._no_split_modules names none of its modules)")
    return classes


def pruned_linear_names(model, block_classes: list[str]) -> list[str]:
    """Names of the Linear layers inside decoder blocks (the pruning targets)."""
    import torch

    names = []
    for block_name, block in model.named_modules():
        if type(block).__name__ not in block_classes:
            continue
        for sub_name, sub in block.named_modules():
            if isinstance(sub, torch.nn.Linear):
                names.append(f"{block_name}.{sub_name}")
    return names


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in (
        "llmcompressor",
        "compressed-tensors",
        "torch",
        "transformers",
        "accelerate",
        "datasets",
        "safetensors",
    ):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def save_plain(model, model_dir: Path, out_dir: Path) -> None:
    """Save as a vanilla HF checkpoint: dense fp32 safetensors, no compression.

    oneshot replaces ``model.save_pretrained`` on the instance with a wrapper
    that writes compressed-tensors metadata into config.json; calling the
    class's own method bypasses it, so any transformers release can load the
    result without compressed-tensors installed.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in list(out_dir.glob("*.safetensors")) + list(out_dir.glob("*.safetensors.index.json")):
        stale.unlink()
    type(model).save_pretrained(model, str(out_dir), safe_serialization=True)
    for name in TOKENIZER_FILES:
        src = model_dir / name
        if src.is_file():
            shutil.copyfile(src, out_dir / name)
    config = json.loads((out_dir / "config.json").read_text())
    for key in ("quantization_config", "compression_config", "sparsity_config"):
        if key in config:
            raise RuntimeError(f"saved config.json unexpectedly has {key!r}")


def read_saved_weights(out_dir: Path, names: list[str]) -> dict:
    from safetensors import safe_open

    wanted = {f"{n}.weight" for n in names}
    found = {}
    for file in sorted(out_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key in wanted:
                    found[key] = f.get_tensor(key)
    missing = wanted - found.keys()
    if missing:
        raise RuntimeError(f"{len(missing)} pruned weights missing from the saved model, e.g. {sorted(missing)[0]}")
    return found


def measure(weights: dict, pattern: tuple[int, int] | None) -> dict:
    """Achieved sparsity over the pruned weights; N:M check when asked."""
    zeros = total = 0
    for w in weights.values():
        zeros += int((w == 0).sum())
        total += w.numel()
    out = {"achieved_sparsity": zeros / total, "n_pruned_params": total}
    if pattern is None:
        return out

    n_keep, m = pattern
    groups = exact = bad = 0
    ragged = []
    for key, w in weights.items():
        rows, cols = w.shape
        full = cols - cols % m
        if full != cols:
            ragged.append(key)
        nonzero = (w[:, :full].reshape(rows, full // m, m) != 0).sum(dim=-1)
        groups += nonzero.numel()
        exact += int((nonzero == n_keep).sum())
        bad += int((nonzero > n_keep).sum())
    if bad:
        raise RuntimeError(
            f"saved weights break the {n_keep}:{m} pattern: {bad} of {groups} groups of {m} have more than {n_keep} non-zeros"
        )
    out["pattern_check"] = {
        "groups": groups,
        "groups_with_more_than_n_nonzeros": bad,
        "groups_with_exactly_n_nonzeros": exact,
        "layers_with_ragged_tail": ragged,
    }
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_inputs(args)
    except UsageError as exc:
        fail(str(exc))

    import torch

    torch.set_num_threads(args.threads)

    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import (
        SparseGPTModifier,
        WandaPruningModifier,
    )
    from torch.utils.data import DataLoader, SequentialSampler
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(args.model)
    out_dir = Path(args.output)

    try:
        config = AutoConfig.from_pretrained(str(model_dir))
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        windows = load_windows(args.windows, int(text_config.vocab_size))
    except UsageError as exc:
        fail(str(exc))
    n_windows, seq_len = (int(x) for x in windows.shape)

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, device_map=None)
    model.eval()
    has_tokenizer = (model_dir / "tokenizer_config.json").is_file() or (model_dir / "tokenizer.json").is_file()
    processor = AutoTokenizer.from_pretrained(str(model_dir)) if has_tokenizer else _NoProcessor()

    try:
        blocks = decoder_block_classes(model)
    except UsageError as exc:
        fail(str(exc))
    targets = pruned_linear_names(model, blocks)
    if not targets:
        fail(f"no Linear layers found inside decoder blocks {blocks}")

    if args.pattern is not None:
        n_keep, m = args.pattern
        sparsity = (m - n_keep) / m
        # llm-compressor's "a:b" = prune a of every b (see module docstring).
        mask_structure = f"{m - n_keep}:{m}"
    else:
        sparsity = args.sparsity
        mask_structure = "0:0"  # unstructured

    modifier_cls = SparseGPTModifier if args.method == "sparsegpt" else WandaPruningModifier
    modifier = modifier_cls(
        sparsity=sparsity,
        mask_structure=mask_structure,
        # Targets are the decoder blocks; the modifier prunes the Linear layers
        # inside each of them, which leaves lm_head and the embeddings alone.
        targets=blocks,
        ignore=["re:.*lm_head"],
    )

    # Calibration data.  With a datasets.Dataset, oneshot builds its own
    # DataLoader: shuffle_calibration_samples=True (its default) draws samples
    # through a RandomSampler; False uses a LengthAwareSampler that orders
    # samples by descending length with an unstable argsort, which for
    # equal-length windows scrambles their order (e.g. 32 windows come out as
    # 16, 31, 30, ...).  Handing oneshot a DataLoader skips both and keeps the
    # windows exactly as given: file order, batch size 1, no truncation or
    # padding.  num_calibration_samples and max_seq_length are then unused by
    # oneshot and are passed only to document the run.
    loader = DataLoader(
        WindowSet(windows),
        batch_size=1,
        sampler=SequentialSampler(range(n_windows)),
        num_workers=0,
    )

    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    oneshot(
        model=model,
        processor=processor,
        recipe=modifier,
        dataset=loader,
        num_calibration_samples=n_windows,
        max_seq_length=seq_len,
        shuffle_calibration_samples=False,
        pipeline="sequential",
        sequential_targets=blocks,
        output_dir=None,  # saved below, outside the timed region
    )
    oneshot_seconds = time.perf_counter() - t0
    rss_after_oneshot = peak_rss_mb()

    save_plain(model, model_dir, out_dir)
    weights = read_saved_weights(out_dir, targets)
    stats = measure(weights, args.pattern)
    del weights

    total_seconds = time.perf_counter() - T_START

    result = {
        "tool": "llmcompressor",
        "versions": package_versions(),
        "method": args.method,
    }
    if args.pattern is not None:
        result["pattern"] = f"{args.pattern[0]}:{args.pattern[1]}"
    else:
        result["sparsity"] = args.sparsity
    result.update(
        {
            "n_windows": n_windows,
            "seq_len": seq_len,
            "oneshot_seconds": round(oneshot_seconds, 3),
            "total_seconds": round(total_seconds, 3),
            "peak_rss_mb": round(rss_after_oneshot, 1),
            "achieved_sparsity": stats["achieved_sparsity"],
            "n_pruned_layers": len(targets),
            "n_pruned_params": stats["n_pruned_params"],
            "threads": args.threads,
            "pipeline": "sequential",
            "modifier": modifier_cls.__name__,
            "mask_structure": mask_structure,
            "modifier_sparsity": sparsity,
            "decoder_block_classes": blocks,
            "peak_rss_mb_before_oneshot": round(rss_before, 1),
            "peak_rss_mb_at_end": round(peak_rss_mb(), 1),
            "model": str(model_dir.resolve()),
            "windows": str(Path(args.windows).resolve()),
            "output": str(out_dir.resolve()),
        }
    )
    if args.method == "sparsegpt":
        result["dampening_frac"] = modifier.dampening_frac
        result["block_size"] = modifier.block_size
    if "pattern_check" in stats:
        result["pattern_check"] = stats["pattern_check"]

    json_path = Path(args.json)
    if json_path.parent and not json_path.parent.exists():
        json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"peer_llmcompressor: {args.method} "
        f"{result.get('pattern', result.get('sparsity'))} on {n_windows}x{seq_len}: "
        f"oneshot {oneshot_seconds:.1f}s, total {total_seconds:.1f}s, "
        f"peak RSS {rss_after_oneshot:.0f} MB, "
        f"sparsity {stats['achieved_sparsity']:.4f} -> {json_path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
