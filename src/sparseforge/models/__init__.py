"""Architecture knowledge: adapters per family (where blocks, attention, FFN, linears are) and module surgery."""

from __future__ import annotations

from .base import (
    AttentionSpec,
    FFNSpec,
    ModelAdapter,
    ReparametrisedLinear,
    get_weight,
    in_features,
    is_prunable,
    is_reparametrised,
    set_weight,
)
from .families import ADAPTERS, BertAdapter, GPT2Adapter, LlamaAdapter, OPTAdapter, adapter_class, get_adapter, supported_model_types
from .modules import (
    STRUCTURE_CLASSES,
    apply_structure,
    block_linears,
    register_structure_class,
    replace_module,
    structure_manifest,
)

__all__ = [
    "ADAPTERS",
    "STRUCTURE_CLASSES",
    "AttentionSpec",
    "BertAdapter",
    "FFNSpec",
    "GPT2Adapter",
    "LlamaAdapter",
    "ModelAdapter",
    "OPTAdapter",
    "ReparametrisedLinear",
    "adapter_class",
    "apply_structure",
    "block_linears",
    "get_adapter",
    "get_weight",
    "in_features",
    "is_prunable",
    "is_reparametrised",
    "register_structure_class",
    "replace_module",
    "set_weight",
    "structure_manifest",
    "supported_model_types",
]
