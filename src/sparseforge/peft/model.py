"""Putting adapter layers into a model, counting them, merging them out again.

Which layers are targets is asked of the model adapter (the linear layers of
each decoder block), so nothing here knows an architecture.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..methods import RECOVERY, get_method_info
from ..models import get_adapter
from ..models.base import get_weight
from ..models.modules import replace_module
from .layers import AdapterLinear, LoRALinear, SPPLinear, rows_per_block

log = logging.getLogger(__name__)



@dataclass
class AdapterConfig:
    """How to wrap a model's block linears for recovery fine-tuning.

    method: "spp" (sparsity-preserving), "lora-star" (LoRA, merged, then the
        original zero pattern re-applied: the SPP paper's baseline) or "lora"
        (plain LoRA: the merge fills the zeros in; kept to show that failure).
    rank: SPP's number of row blocks r; LoRA's rank. For the LoRA methods,
        None picks the rank whose trainable-parameter count is closest to SPP's
        at ``spp_rank`` on the same targets (equal budget, as in the paper).
    targets: block-relative layer names or their last parts ("q_proj",
        "mlp.down_proj"); None = every linear layer in the decoder blocks.
    """

    method: str = "spp"
    rank: int | None = None
    spp_rank: int = 16
    scale: float = 1.0
    lora_alpha: float | None = None
    targets: tuple[str, ...] | None = None
    seed: int = 0

    def __post_init__(self):
        get_method_info(self.method, RECOVERY)
        if not (math.isfinite(self.scale) and self.scale != 0):
            raise ConfigError(f"scale {self.scale} must be a finite non-zero number")
        if self.lora_alpha is not None and not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ConfigError(f"lora alpha {self.lora_alpha} must be positive")
        for name, value in (("rank", self.rank), ("spp_rank", self.spp_rank)):
            if value is not None and value < 1:
                raise ConfigError(f"{name} {value} must be a positive integer")


def target_layers(model: nn.Module, targets: tuple[str, ...] | None = None) -> dict[str, nn.Module]:
    """Full name -> module of every targeted linear layer in the decoder blocks."""
    adapter = get_adapter(model)
    chosen, seen = {}, set()
    for index, block in enumerate(adapter.blocks):
        for name, module in adapter.block_linears(block).items():
            hit = targets is None or any(name == t or name.endswith("." + t) for t in targets)
            if hit:
                chosen[f"{adapter.block_prefix(index)}.{name}"] = module
                seen.update(t for t in targets or () if name == t or name.endswith("." + t))
    missing = set(targets or ()) - seen
    if missing:
        raise ConfigError(f"target layer(s) {', '.join(sorted(missing))} not in the blocks; "
                          f"choose from {', '.join(adapter.linear_names)}")
    return chosen


def spp_parameter_count(layers: dict[str, nn.Module], rank: int) -> int:
    total = 0
    for module in layers.values():
        out_features, in_features = get_weight(module).shape
        total += rows_per_block(out_features, rank)[0] * in_features + out_features
    return total


def lora_rank_for_budget(layers: dict[str, nn.Module], spp_rank: int) -> int:
    """The LoRA rank whose parameter count on ``layers`` is nearest SPP's at ``spp_rank``."""
    per_rank = sum(sum(get_weight(m).shape) for m in layers.values())
    return max(1, round(spp_parameter_count(layers, spp_rank) / per_rank))


def inject_adapters(model: nn.Module, config: AdapterConfig) -> dict[str, AdapterLinear]:
    """Wrap the target layers in place; freeze everything else. Returns name -> adapter layer."""
    if any(isinstance(m, AdapterLinear) for m in model.modules()):
        raise ConfigError("the model already has adapter layers: merge them first")
    layers = target_layers(model, config.targets)
    rank = config.rank
    if config.method != "spp" and rank is None:
        rank = lora_rank_for_budget(layers, config.spp_rank)
        log.info("LoRA rank %d matches SPP's trainable parameters at r=%d", rank, config.spp_rank)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = {}
    for index, (name, module) in enumerate(layers.items()):
        seed = config.seed * 100003 + index  # each layer's own stream: independent of the order of others
        if config.method == "spp":
            layer = SPPLinear(module, rank=rank or config.spp_rank, scale=config.scale, seed=seed)
        else:
            layer = LoRALinear(module, rank=rank, lora_alpha=config.lora_alpha,
                               keep_mask=config.method == "lora-star", seed=seed)
        replace_module(model, name, layer)
        wrapped[name] = layer
    return wrapped


def adapter_layers(model: nn.Module) -> dict[str, AdapterLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLinear)}


def merge_adapters(model: nn.Module) -> list[str]:
    """Merge every adapter into its base weight and put the plain base layer back."""
    names = []
    for name, layer in adapter_layers(model).items():
        layer.merge(safe_merge=True, keep_original=False)  # no copy: the adapter is discarded
        replace_module(model, name, layer.base)
        names.append(name)
    return names


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The learned adapter tensors alone, by full parameter name."""
    return {f"{name}.{p}": t.detach().clone() for name, layer in adapter_layers(model).items()
            for p, t in layer.adapter_parameters().items()}


def trainable_report(model: nn.Module) -> dict:
    """Trainable parameters: count, and per mille of the model (the SPP paper's Table 1 unit)."""
    added = {id(p) for layer in adapter_layers(model).values() for p in layer.adapter_parameters().values()}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters() if id(p) not in added)
    return {"trainable": trainable, "model": total, "per_mille": 1000.0 * trainable / max(total, 1)}


def zero_masks(model: nn.Module, layers: dict[str, nn.Module] | None = None) -> dict[str, torch.Tensor]:
    """name -> boolean zero pattern of each target layer's weight (adapter layers: their base weight)."""
    layers = layers if layers is not None else target_layers(model)
    return {n: (get_weight(m.base if isinstance(m, AdapterLinear) else m) == 0).cpu() for n, m in layers.items()}


def compare_masks(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict:
    """Whether two zero patterns are identical bit for bit, with counts."""
    changed = [n for n in before if n not in after or not torch.equal(before[n], after[n])]
    return {
        "identical": not changed,
        "zeros_before": int(sum(int(m.sum()) for m in before.values())),
        "zeros_after": int(sum(int(m.sum()) for m in after.values())),
        "layers_changed": changed,
    }
