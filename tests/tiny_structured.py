"""Tiny models and helpers for the structured-sparsity tests: builders with biases and
dropout where the families have them, the masked reference model, random plans."""

from __future__ import annotations

import copy
import random

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)
from transformers.pytorch_utils import Conv1D

VOCAB = 96


def llama(bias: bool = False, layers: int = 2):
    """4 query heads / 2 KV heads of 16 dims (RoPE, GQA); ``bias`` adds q/k/v/o and MLP biases (Qwen2-like)."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, attention_bias=bias, mlp_bias=bias)
    return LlamaForCausalLM(config)


def llama_heads(hidden: int, heads: int, kv_heads: int, head_dim: int, layers: int = 2, ffn: int = 24):
    """A LLaMA whose head count times head_dim differs from hidden_size (its config still checks hidden % heads)."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                         max_position_embeddings=128)
    return LlamaForCausalLM(config)


def opt():
    config = OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=128, word_embed_proj_dim=32)
    return OPTForCausalLM(config)


def gpt2():
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=128, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def bert():
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=128, num_labels=3)
    return BertForSequenceClassification(config)


BUILDERS = {"llama": llama, "llama-bias": lambda: llama(bias=True), "opt": opt, "gpt2": gpt2, "bert": bert,
            # 2 query heads per KV group, hidden 64: 3 groups (6 heads) is a count LlamaConfig refuses
            "llama-8x4": lambda: llama_heads(64, 8, 4, 8),
            # SmolLM2's head layout (9 heads / 3 KV heads, hidden 576) scaled down: every count 3, 2, 1 divides
            "smol-like": lambda: llama_heads(36, 9, 3, 4)}


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = BUILDERS[name]()
    with torch.no_grad():  # biases are zero at init: make them matter
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, Conv1D)) and module.bias is not None:
                module.bias.normal_(0, 0.05)
    return model.eval()


@torch.no_grad()
def masked(model, couples, units):
    """A copy of ``model`` with every planned unit's rows (and their bias entries) and columns zeroed."""
    out = copy.deepcopy(model)
    by_name = {c.name: c for c in couples}
    for name, us in units.items():
        for m in by_name[name].members:
            module = out.get_submodule(m.layer)
            index = m.index[us].flatten()
            conv = isinstance(module, Conv1D)
            weight = module.weight.T if conv else module.weight
            if m.dim == 0:
                weight[index, :] = 0
                if module.bias is not None:
                    module.bias[index] = 0
            else:
                weight[:, index] = 0
    return out


def random_units(couples, seed: int, fraction: float = 0.4, whole_groups: dict | None = None, qk_empty: set | None = None):
    """A random plan: each couple loses about ``fraction`` of its units (never all);
    ``whole_groups`` {block: [groups]} go whole; ``qk_empty`` {(block, group)} lose every QK unit but keep V."""
    rng = random.Random(seed)
    whole_groups = whole_groups or {}
    qk_empty = qk_empty or set()
    units = {}
    for c in couples:
        if c.group is not None and c.group in whole_groups.get(c.block, ()):
            units[c.name] = list(range(c.units))
        elif c.kind == "qk" and (c.block, c.group) in qk_empty:
            units[c.name] = list(range(c.units))
        else:
            count = max(1, min(c.units - 1, round(fraction * c.units)))
            units[c.name] = sorted(rng.sample(range(c.units), count))
    return units
