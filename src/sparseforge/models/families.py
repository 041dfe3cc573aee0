"""Adapters for the supported architecture families."""

from __future__ import annotations

from .base import FFNSpec, ModelAdapter


class LlamaAdapter(ModelAdapter):
    """LLaMA and the families sharing its block layout (Mistral, Qwen2/3, SmolLM2)."""

    model_types = ("llama", "mistral", "qwen2", "qwen3")
    linear_groups = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    )
    ffn = FFNSpec(activation="silu_gated", gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj",
                  act="mlp.act_fn")


class OPTAdapter(ModelAdapter):
    model_types = ("opt",)
    linear_groups = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.out_proj",),
        ("fc1",),
        ("fc2",),
    )
    ffn = FFNSpec(activation="relu", up="fc1", down="fc2", act="activation_fn")


class GPT2Adapter(ModelAdapter):
    """GPT-2: fused q/k/v projection; its Conv1D layers are transposed Linears."""

    model_types = ("gpt2",)
    linear_groups = (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",))
    ffn = FFNSpec(activation="gelu", up="mlp.c_fc", down="mlp.c_proj", act="mlp.act")


ADAPTERS: tuple[type[ModelAdapter], ...] = (LlamaAdapter, OPTAdapter, GPT2Adapter)
