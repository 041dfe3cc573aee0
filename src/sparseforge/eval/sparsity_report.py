"""What a model's weights look like: per-layer sparsity, N:M patterns, parameter counts, structured modules."""

from __future__ import annotations

import torch

from ..models import get_adapter, get_weight
from ..models.modules import module_structure
from ..sparsity.masks import detect_nm, sparsity_of


@torch.no_grad()
def sparsity_summary(model) -> dict:
    """Per prunable layer: shape, sparsity, the N:M pattern it satisfies; totals for the model.

    A reparametrised linear (LoSparse's U V + S, a compact layer) is described by the dense
    weight it applies; the model's parameter counts are of its stored parameters.
    """
    adapter = get_adapter(model)
    layers = []
    for index, block in enumerate(adapter.blocks):
        prefix = adapter.block_prefix(index)
        for name, module in adapter.block_linears(block).items():
            weight = get_weight(module).detach()
            layers.append(
                {
                    "name": f"{prefix}.{name}",
                    "shape": list(weight.shape),
                    "sparsity": sparsity_of(weight),
                    "pattern": detect_nm(weight),
                }
            )
    seen, total, zeros = set(), 0, 0
    for param in model.parameters():
        if id(param) in seen:  # tied embeddings count once
            continue
        seen.add(id(param))
        total += param.numel()
        zeros += int((param == 0).sum())
    linear_params = sum(l["shape"][0] * l["shape"][1] for l in layers)
    linear_zeros = sum(round(l["sparsity"] * l["shape"][0] * l["shape"][1]) for l in layers)
    return {
        "architecture": type(model).__name__,
        "parameters": total,
        "nonzero_parameters": total - zeros,
        "prunable_parameters": linear_params,
        "prunable_sparsity": linear_zeros / max(linear_params, 1),
        "model_sparsity": zeros / max(total, 1),
        "layers": layers,
    }


def structure_summary(model) -> list[dict]:
    """For each module with ``structure()`` (outermost only): ``{"name", "structure", "parameters"}``,
    ``parameters`` counting the module's own parameters (its submodules' included, shared ones once)."""
    rows: list[dict] = []
    for name, module in model.named_modules():
        if not callable(getattr(module, "structure", None)) or any(name.startswith(r["name"] + ".") for r in rows):
            continue
        rows.append({"name": name, "structure": module_structure(module),
                     "parameters": sum(p.numel() for p in module.parameters())})
    return rows
