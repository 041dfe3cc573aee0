"""Tiny CPU models built from configs, one per supported family, and test inputs."""

from __future__ import annotations

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
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 128


def tiny_llama():
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config)


def tiny_qwen2(**overrides):
    """Qwen2: the LLaMA layout with biases on q/k/v, and an attention that takes its mask without a default."""
    config = Qwen2Config(**{"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
                            **overrides})
    return Qwen2ForCausalLM(config)


def tiny_qwen2_mixed():
    """Qwen2 whose layers mix full attention (layer 0) and sliding-window attention (layers 1, 2) over
    a window of 8 tokens, shorter than the test windows: the model hands its blocks different masks."""
    return tiny_qwen2(num_hidden_layers=3, use_sliding_window=True, sliding_window=8, max_window_layers=1)


def tiny_opt():
    config = OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=256, word_embed_proj_dim=64)
    return OPTForCausalLM(config)


def tiny_gpt2():
    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    return GPT2LMHeadModel(config)


def tiny_bert(num_labels: int = 3):
    """A BERT encoder with a sequence-classification head (bidirectional: not in TINY_MODELS)."""
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=256, num_labels=num_labels)
    return BertForSequenceClassification(config)


#: causal language models: every one-shot test runs over these
TINY_MODELS = {"llama": tiny_llama, "opt": tiny_opt, "gpt2": tiny_gpt2, "qwen2": tiny_qwen2}
#: encoders, for classification
TINY_ENCODERS = {"bert": tiny_bert}


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """(n, d) inputs with strongly correlated features and uneven scales, like LLM activations."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g) / d**0.5
    scales = torch.logspace(-1, 1, d)[torch.randperm(d, generator=g)]
    return (torch.randn(n, d, generator=g) @ mixing + 0.1 * torch.randn(n, d, generator=g)) * scales
