"""What a plain HF config can hold in the uniform layout: its keys per family, and the KV-group
counts the family's config class accepts.

The config class is the judge: transformers 5.x validates some families' configs (LLaMA:
``hidden_size % num_attention_heads == 0`` even with an explicit ``head_dim``) at
construction and again at ``save_pretrained``, others (Qwen3) do not. So the accepted
counts come from constructing ``type(config)`` with each candidate's heads / KV heads,
cached per config. If the class refuses even the config's own counts (it cannot be
rebuilt from its dict), the rule LLaMA validates stands in: the heads divide hidden_size.
"""

from __future__ import annotations

import functools
import json

from torch import nn

from ..models import BertAdapter, GPT2Adapter, LlamaAdapter, OPTAdapter, get_adapter

#: config keys of the uniform layout per family: FFN width, query heads, KV heads (None: = heads), explicit head size
#: (None: the family derives it from hidden_size / heads, so its heads cannot change in a plain checkpoint)
CONFIG_KEYS = {
    LlamaAdapter: {"ffn": "intermediate_size", "heads": "num_attention_heads", "kv_heads": "num_key_value_heads",
                   "head_dim": "head_dim"},
    OPTAdapter: {"ffn": "ffn_dim", "heads": "num_attention_heads", "kv_heads": None, "head_dim": None},
    GPT2Adapter: {"ffn": "n_inner", "heads": "n_head", "kv_heads": None, "head_dim": None},
    BertAdapter: {"ffn": "intermediate_size", "heads": "num_attention_heads", "kv_heads": None, "head_dim": None},
}


def config_keys(adapter) -> dict | None:
    """The family's uniform-layout config keys (None: no plain config for it)."""
    return next((k for cls, k in CONFIG_KEYS.items() if isinstance(adapter, cls)), None)


def _accepts(config_class, data: dict, heads_key: str, kv_key: str, group_size: int, groups: int) -> bool:
    try:
        config_class(**{**data, heads_key: groups * group_size, kv_key: groups})
    except Exception:  # noqa: BLE001 - any refusal (strict-dataclass validation, ValueError...) means "not this count"
        return False
    return True


@functools.lru_cache(maxsize=64)
def _accepted_counts(config_class, config_json: str, heads_key: str, kv_key: str, group_size: int,
                     groups: int) -> tuple[int, ...]:
    data = json.loads(config_json)
    candidates = range(1, groups + 1)
    if _accepts(config_class, data, heads_key, kv_key, group_size, groups):
        return tuple(n for n in candidates if _accepts(config_class, data, heads_key, kv_key, group_size, n))
    hidden = data.get("hidden_size")
    if not isinstance(hidden, int):
        return tuple(candidates)
    return tuple(n for n in candidates if hidden % (n * group_size) == 0)


def allowed_group_counts(model: nn.Module) -> tuple[int, ...]:
    """KV-group counts per layer (ascending, at most the config's) a plain config of ``model`` can hold,
    head size and query heads per group unchanged. A family whose head size is hidden_size / heads
    keeps its count; a family with no plain config keys may go to any count (``uniform_config``
    refuses it anyway)."""
    adapter = get_adapter(model)
    spec = adapter.attention()
    keys = config_keys(adapter)
    if keys is None:
        return tuple(range(1, spec.num_kv_heads + 1))
    if keys["head_dim"] is None or keys["kv_heads"] is None:
        return (spec.num_kv_heads,)
    config = model.config
    return _accepted_counts(type(config), config.to_json_string(use_diff=False), keys["heads"], keys["kv_heads"],
                            spec.group_size, spec.num_kv_heads)
