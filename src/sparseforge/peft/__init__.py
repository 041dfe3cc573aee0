"""Recovery fine-tuning adapters: SPP (sparsity-preserving) and the LoRA baselines."""

from .layers import AdapterLinear, LoRALinear, SPPLinear, rows_per_block
from .model import (
    AdapterConfig,
    adapter_layers,
    adapter_state_dict,
    compare_masks,
    inject_adapters,
    lora_rank_for_budget,
    merge_adapters,
    target_layers,
    trainable_report,
    zero_masks,
)

__all__ = [
    "AdapterConfig",
    "AdapterLinear",
    "LoRALinear",
    "SPPLinear",
    "adapter_layers",
    "adapter_state_dict",
    "compare_masks",
    "inject_adapters",
    "lora_rank_for_budget",
    "merge_adapters",
    "rows_per_block",
    "target_layers",
    "trainable_report",
    "zero_masks",
]
