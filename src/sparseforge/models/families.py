"""Adapters for the supported architecture families."""

from __future__ import annotations

from torch import nn

from ..errors import ModelError
from .base import AttentionSpec, FFNSpec, ModelAdapter, ResidualBranch


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
                  act="mlp.act_fn", module="mlp")
    residual_branches = (ResidualBranch("input_layernorm", "self_attn", block_kwargs=True),
                         ResidualBranch("post_attention_layernorm", "mlp"))

    def attention(self) -> AttentionSpec:
        c = self.model.config
        heads = c.num_attention_heads
        return AttentionSpec(module="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                             o="self_attn.o_proj", num_heads=heads, num_kv_heads=c.num_key_value_heads or heads,
                             head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads, rope=True)


class OPTAdapter(ModelAdapter):
    model_types = ("opt",)
    linear_groups = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.out_proj",),
        ("fc1",),
        ("fc2",),
    )
    ffn = FFNSpec(activation="relu", up="fc1", down="fc2", act="activation_fn")

    def attention(self) -> AttentionSpec:
        c = self.model.config
        heads = c.num_attention_heads
        return AttentionSpec(module="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                             o="self_attn.out_proj", num_heads=heads, num_kv_heads=heads,
                             head_dim=c.hidden_size // heads)


class GPT2Adapter(ModelAdapter):
    """GPT-2: fused q/k/v projection; its Conv1D layers are transposed Linears."""

    model_types = ("gpt2",)
    linear_groups = (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",))
    ffn = FFNSpec(activation="gelu", up="mlp.c_fc", down="mlp.c_proj", act="mlp.act", module="mlp")
    residual_branches = (ResidualBranch("ln_1", "attn", block_kwargs=True), ResidualBranch("ln_2", "mlp"))

    def attention(self) -> AttentionSpec:
        c = self.model.config
        return AttentionSpec(module="attn", q=None, k=None, v=None, qkv="attn.c_attn", o="attn.c_proj",
                             num_heads=c.n_head, num_kv_heads=c.n_head, head_dim=c.n_embd // c.n_head)


class BertAdapter(ModelAdapter):
    """BERT-family encoders (BERT, MiniLM, RoBERTa): bidirectional, post-LayerNorm, GELU FFN."""

    model_types = ("bert", "roberta")
    causal = False
    blocks_path = "encoder.layer"  # BERT declares no _no_split_modules
    linear_groups = (
        ("attention.self.query", "attention.self.key", "attention.self.value"),
        ("attention.output.dense",),
        ("intermediate.dense",),
        ("output.dense",),
    )
    ffn = FFNSpec(activation="gelu", up="intermediate.dense", down="output.dense", act="intermediate.intermediate_act_fn")

    def attention(self) -> AttentionSpec:
        c = self.model.config
        heads = c.num_attention_heads
        return AttentionSpec(module="attention", q="attention.self.query", k="attention.self.key",
                             v="attention.self.value", o="attention.output.dense", num_heads=heads,
                             num_kv_heads=heads, head_dim=c.hidden_size // heads)

    def context_length(self) -> int:
        # position ids start after the padding index in RoBERTa; BERT uses them all
        offset = 2 if self.model.config.model_type == "roberta" else 0
        return int(self.model.config.max_position_embeddings) - offset


ADAPTERS: tuple[type[ModelAdapter], ...] = (LlamaAdapter, OPTAdapter, GPT2Adapter, BertAdapter)


def supported_model_types() -> list[str]:
    return sorted(t for adapter in ADAPTERS for t in adapter.model_types)


def adapter_class(model_type: str | None, class_name: str | None = None) -> type[ModelAdapter]:
    """The adapter class for a ``config.model_type``; a one-line ModelError if there is none."""
    for adapter_cls in ADAPTERS:
        if model_type in adapter_cls.model_types:
            return adapter_cls
    what = f"{class_name} (model_type '{model_type}')" if class_name else f"model_type '{model_type}'"
    raise ModelError(
        f"unsupported architecture {what}: supported are {', '.join(supported_model_types())}; "
        "add an adapter in sparseforge/models/families.py listing its block's linear layers"
    )


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``, chosen by ``config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    adapter = adapter_class(model_type, type(model).__name__)(model)
    adapter.check()
    return adapter
