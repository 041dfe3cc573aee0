"""Saved model directories whose pruned weights are compressed tensors (``sparse_format``'s layouts).

Writing (``compress_directory``): after ``save_pretrained`` has written the dense safetensors, each
block linear's 2-D weight that gets smaller is replaced by its compressed tensors, named as
compressed-tensors names them (``model.layers.0.mlp.up_proj.weight`` becomes
``model.layers.0.mlp.up_proj.compressed``, ``.bitmask``, ``.row_offsets``, ``.shape``; a parameter not
called ``weight`` keeps its name as the prefix), and ``config.json`` announces it as compressed-tensors
does::

    "quantization_config": {"quant_method": "compressed-tensors", "format": "dense",
                            "sparsity_config": {"format": "sparse-bitmask" | "sparse-24-bitmask",
                                                "sparsity_structure": "unstructured" | "2:4",
                                                "global_sparsity": <zeros among the compressed weights>,
                                                "targets": [<module names>], "ignore": []}}

Embeddings, norms, biases and the head stay dense; so does a weight the layout would not shrink.
The packed 2:4 layout is chosen when every compressed weight fits it and it is no larger.

Reading (``announced_format``, ``decompress_state``): the format comes from ``config.json`` (also the
older places compressed-tensors put it: ``compression_config.sparsity_config`` and a top-level
``sparsity_config``), compared with the known names only: nothing a checkpoint says chooses code to
import or run. Quantized compressed-tensors checkpoints are refused. Weights are decompressed into
ordinary dense tensors: the loaded model takes as much memory as a dense one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from .errors import ModelError, first_line
from .sparse_format import (
    BITMASK,
    FORMATS,
    PACKED_24,
    PARTS,
    CompressedTensorError,
    bitmask_bytes,
    compress_24,
    compress_bitmask,
    count,
    decompress,
    packed_24_bytes,
    packs_24,
    stored_entries,
)

log = logging.getLogger(__name__)

QUANT_METHOD = "compressed-tensors"
#: config.json keys that describe compressed tensors; removed from the config of the model built to hold the weights
CONFIG_KEYS = ("quantization_config", "compression_config", "sparsity_config")
_PART_NAMES = sorted({p for parts in PARTS.values() for p in parts})
_FIX = "the file is damaged: copy it again or save the model again"


# ---------------------------------------------------------------- reading


def announced_format(config: Mapping, path: Path) -> str | None:
    """The sparsity format ``config`` (a config.json's content) announces: None for a checkpoint without
    compressed-tensors settings, else "dense", "sparse-bitmask" or "sparse-24-bitmask"."""
    quant = config.get("quantization_config")
    if isinstance(quant, Mapping) and quant.get("quant_method") == QUANT_METHOD:
        sparsity, quantized = quant.get("sparsity_config"), bool(quant.get("config_groups"))
    elif isinstance(config.get("compression_config"), Mapping):  # compressed-tensors before 0.7
        compression = config["compression_config"]
        sparsity = compression.get("sparsity_config")
        quantized = bool(compression.get("quantization_config") or compression.get("config_groups"))
    elif isinstance(config.get("sparsity_config"), Mapping) and config["sparsity_config"].get("format") in FORMATS:
        sparsity, quantized = config["sparsity_config"], False  # sparseml's first sparse checkpoints (a model's own
        # "sparsity_config" field, naming no known format, is left alone)
    else:
        return None
    if quantized:
        raise ModelError(f"{path} holds a quantized compressed-tensors checkpoint: sparseforge reads only its sparse "
                         f"formats ({', '.join(FORMATS)}) without quantization; decompress it with compressed-tensors first")
    layout = sparsity.get("format") if isinstance(sparsity, Mapping) and sparsity else "dense"
    if layout not in (*FORMATS, "dense"):
        raise ModelError(f"{path} announces the sparsity format {layout!r}, which sparseforge does not read (it reads "
                         f"{', '.join(FORMATS)}); decompress it with the tool that wrote it")
    return layout


def _grouped(state: dict[str, torch.Tensor], expected: Mapping) -> dict[str, dict[str, torch.Tensor]]:
    """Take the compressed parts out of ``state``: {name prefix: {part: tensor}}."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key in list(state):
        stem, _, part = key.rpartition(".")
        if part in _PART_NAMES and stem and key not in expected:
            groups.setdefault(stem, {})[part] = state.pop(key)
    return groups


def _target(stem: str, expected: Mapping) -> str | None:
    """The model's tensor a prefix stands for: the prefix itself (a full parameter name, as older
    compressed-tensors wrote it) or the prefix's ``.weight`` (as newer ones write it)."""
    return next((name for name in (stem, f"{stem}.weight") if name in expected), None)


def decompress_state(state: dict[str, torch.Tensor], layout: str, expected: Mapping[str, torch.Size],
                     origins: Mapping[str, Path], model_dir: Path) -> dict[str, torch.Tensor]:
    """Replace the compressed tensors of ``state`` (read from ``model_dir``; ``origins`` says which file held
    each key) by the dense weights, checked against the model's ``expected`` shapes. Every fault is one line
    naming the file and the tensor."""
    groups = _grouped(state, expected)
    if groups and layout not in FORMATS:
        stem = next(iter(groups))
        raise ModelError(f"{_origin(stem, groups[stem], origins, model_dir)} holds compressed tensors ({stem}.*) "
                         f"but {model_dir / 'config.json'} announces no sparse format: restore its quantization_config")
    for stem, parts in groups.items():
        where = _origin(stem, parts, origins, model_dir)
        target = _target(stem, expected)
        if target is None:
            raise ModelError(f"compressed tensor {stem} in {where} matches no weight of the model ({stem} or {stem}.weight): "
                             "the file and config.json disagree; save the model again")
        if target in state:
            raise ModelError(f"{target} is stored both dense and compressed in {where}: {_FIX}")
        try:
            weight = decompress(parts, layout)
        except CompressedTensorError as e:
            raise ModelError(f"cannot decompress {stem} in {where}: {e}; {_FIX}") from None
        if weight.shape != expected[target]:
            raise ModelError(f"compressed tensor {stem} in {where} has shape {tuple(weight.shape)}, but the model's "
                             f"{target} is {tuple(expected[target])}: {_FIX}")
        state[target] = weight
    return state


def _origin(stem: str, parts: Mapping, origins: Mapping[str, Path], model_dir: Path) -> Path:
    for part in parts:
        if f"{stem}.{part}" in origins:
            return origins[f"{stem}.{part}"]
    return model_dir


# ---------------------------------------------------------------- writing


def _candidates(model) -> dict[str, torch.Tensor]:
    """State-dict name -> tensor of every 2-D floating parameter of the block linears (a Linear's weight;
    a compact layer's factors): the only tensors pruning makes sparse."""
    from .models.modules import block_linears

    return {f"{name}.{param}": tensor.detach()
            for name, module in block_linears(model).items()
            for param, tensor in module.named_parameters()
            if tensor.dim() == 2 and tensor.is_floating_point()}


def choose_layout(tensors: Mapping[str, torch.Tensor]) -> tuple[str | None, list[str]]:
    """(layout, names to compress): the weights the bitmask layout shrinks, in the packed 2:4 layout when
    all of them fit it and it is no larger; (None, []) when no weight would shrink."""
    shrink, bitmask_total, packed_total, all_pack = [], 0, 0, True
    for name, tensor in tensors.items():
        rows, columns = tensor.shape
        size = bitmask_bytes(rows, columns, int(count(stored_entries(tensor))), tensor.element_size())
        if size >= tensor.numel() * tensor.element_size():
            continue
        shrink.append(name)
        bitmask_total += size
        fits = packs_24(tensor)
        all_pack = all_pack and fits
        packed_total += packed_24_bytes(rows, columns, tensor.element_size()) if fits else 0
    if not shrink:
        return None, []
    return (PACKED_24 if all_pack and packed_total <= bitmask_total else BITMASK), shrink


def _prefix(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def _weight_files(directory: Path) -> tuple[list[Path], Path | None]:
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        return [single], None
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / f for f in sorted(set(weight_map.values()))], index
    raise ModelError(f"{directory} has no model.safetensors: compressed weights are written into safetensors only")


def compress_directory(directory: Path, model) -> dict:
    """Rewrite the weights ``save_pretrained`` wrote in ``directory`` with the compressible weights of
    ``model`` compressed, and announce the format in config.json; return what was done (for sparseforge.json)."""
    from safetensors.torch import load_file, save_file

    layout, names = choose_layout(_candidates(model))
    files, index = _weight_files(directory)
    dense_bytes = sum(p.stat().st_size for p in files)
    if layout is None:
        return {"format": "dense", "reason": "no block linear has enough zeros for the compressed layout to be smaller",
                "bytes": dense_bytes, "dense_bytes": dense_bytes}
    compress = compress_24 if layout == PACKED_24 else compress_bitmask
    wanted, written, zeros, entries = set(names), {}, 0, 0
    for path in files:
        state = load_file(path)
        out: dict[str, torch.Tensor] = {}
        for key, tensor in state.items():
            if key not in wanted:
                out[key] = tensor
                continue
            zeros += tensor.numel() - int(count(stored_entries(tensor)))
            entries += tensor.numel()
            for part, value in compress(tensor).items():
                out[f"{_prefix(key)}.{part}"] = value
                written[f"{_prefix(key)}.{part}"] = path.name
            written[key] = None
        save_file(out, path, metadata={"format": "pt"})
    missing = wanted - set(written)
    if missing:
        raise ModelError(f"save_pretrained did not write {sorted(missing)[0]}: cannot compress a weight that is not saved")
    if index is not None:
        data = json.loads(index.read_text())
        data["weight_map"] = {k: v for k, v in {**data["weight_map"], **written}.items() if v is not None}
        data.get("metadata", {}).pop("total_size", None)  # no longer the size of the dense tensors
        index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    targets = sorted({n.rpartition(".")[0] for n in names})  # the modules that own the compressed weights
    sparsity = {"format": layout, "sparsity_structure": "2:4" if layout == PACKED_24 else "unstructured",
                "global_sparsity": round(zeros / max(entries, 1), 6), "targets": targets, "ignore": []}
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = {"quant_method": QUANT_METHOD, "format": "dense", "sparsity_config": sparsity}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    compressed_bytes = sum(p.stat().st_size for p in files)
    log.info("compressed %d weights (%s): %.1f MiB instead of %.1f MiB", len(names), layout, compressed_bytes / 2**20,
             dense_bytes / 2**20)
    return {"format": layout, "compressed_weights": len(names), "global_sparsity": sparsity["global_sparsity"],
            "bytes": compressed_bytes, "dense_bytes": dense_bytes, "ratio": round(compressed_bytes / dense_bytes, 4)}


def read_config(model_dir: Path) -> dict:
    """config.json as a dict ({} if unreadable: the loader's own checks report that)."""
    try:
        data = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        log.debug("config.json of %s unreadable: %s", model_dir, first_line(e))
        return {}
    return data if isinstance(data, dict) else {}


__all__ = ["CONFIG_KEYS", "QUANT_METHOD", "announced_format", "choose_layout", "compress_directory", "decompress_state",
           "read_config"]
