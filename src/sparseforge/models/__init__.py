"""Adapter lookup: model -> the adapter of its architecture family."""

from __future__ import annotations

from torch import nn

from ..errors import ModelError
from .base import AttentionSpec, FFNSpec, ModelAdapter, get_weight, in_features, is_prunable, set_weight
from .families import ADAPTERS, BertAdapter, GPT2Adapter, LlamaAdapter, OPTAdapter


def supported_model_types() -> list[str]:
    return sorted(t for adapter in ADAPTERS for t in adapter.model_types)


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``, chosen by ``config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for adapter_cls in ADAPTERS:
        if model_type in adapter_cls.model_types:
            adapter = adapter_cls(model)
            adapter.check()
            return adapter
    raise ModelError(
        f"unsupported architecture {type(model).__name__} (model_type '{model_type}'): "
        f"supported are {', '.join(supported_model_types())}; add an adapter in "
        "sparseforge/models/families.py listing its block's linear layers"
    )


__all__ = [
    "AttentionSpec",
    "BertAdapter",
    "FFNSpec",
    "GPT2Adapter",
    "LlamaAdapter",
    "ModelAdapter",
    "OPTAdapter",
    "get_adapter",
    "get_weight",
    "in_features",
    "is_prunable",
    "set_weight",
    "supported_model_types",
]
