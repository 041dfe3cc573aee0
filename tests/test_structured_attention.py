"""CompactAttention beyond the default path: additive (eager) masks, chunked prefill after a
cache, the manifest round trip of one module, and models that take whole KV groups only."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from sparseforge.errors import ConfigError
from sparseforge.eval.speed import cache_argument, returned_cache
from sparseforge.structured import (
    CompactAttention,
    apply_plan,
    build_couples,
    compact_capable,
    normalize_units,
    plan_round,
)
from tiny_structured import VOCAB, build, masked, random_units

pytestmark = pytest.mark.usefixtures("one_thread")


def tokens(batch=2, length=10, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x, mask=None, **kwargs):
    with torch.no_grad():
        return model(x, attention_mask=mask, **kwargs).logits


def test_eager_additive_masks_give_the_masked_models_logits():
    model = build("llama")
    model.set_attn_implementation("eager")  # the model passes float (additive) masks
    couples = build_couples(model)
    units = normalize_units(couples, random_units(couples, seed=2, qk_empty={(1, 1)}))
    reference = masked(model, couples, units)
    apply_plan(model, units)
    assert isinstance(model.model.layers[1].self_attn, CompactAttention)
    x, mask = tokens(), torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0
    torch.testing.assert_close(logits(model, x, mask), logits(reference, x, mask), atol=1e-5, rtol=1e-5)


def test_chunked_prefill_after_a_cache_equals_the_full_forward():
    model = build("llama")
    apply_plan(model, random_units(build_couples(model), seed=8, whole_groups={0: [0]}))
    x = tokens(length=9, seed=3)
    full = logits(model, x)
    with torch.no_grad():
        first = model(x[:, :4], use_cache=True)
        second = model(x[:, 4:], use_cache=True, **{cache_argument(model): returned_cache(first)})
    torch.testing.assert_close(second.logits, full[:, 4:], atol=1e-5, rtol=1e-5)


def test_generate_runs_on_the_compact_model():
    model = build("llama")
    apply_plan(model, random_units(build_couples(model), seed=1))
    x = tokens(batch=1, length=5)
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False, pad_token_id=0)
    # greedy decoding with the cache equals arg-max over full forwards
    seq = x
    for _ in range(4):
        seq = torch.cat([seq, logits(model, seq)[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, seq)


def test_compact_attention_rebuilds_from_its_structure():
    model = build("gpt2")
    apply_plan(model, random_units(build_couples(model), seed=4))
    attn = model.transformer.h[1].attn
    assert isinstance(attn, CompactAttention) and attn.roles == ("qkv", "o")
    rebuilt = CompactAttention.from_structure(attn.structure(), torch.float32)
    rebuilt.load_state_dict(attn.state_dict())
    rebuilt.eval()
    hidden = torch.randn(2, 6, 32)
    torch.testing.assert_close(rebuilt(hidden)[0], attn(hidden)[0], atol=0, rtol=0)
    assert rebuilt.structure() == attn.structure()


def tiny_qwen3():
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    return Qwen3ForCausalLM(config).eval()


def test_models_with_per_head_norms_take_whole_groups_only():
    model = tiny_qwen3()  # q_norm / k_norm over each head: removing a pair changes the norm
    assert not compact_capable(model) and compact_capable(build("llama"))
    couples = build_couples(model)
    with pytest.raises(ConfigError, match="per-group sizes"):
        apply_plan(model, {"model.layers.0:qk.0": [0]})
    scores = {c.name: (0.001 if c.name.startswith("model.layers.1:") and c.group == 1 else 1.0 + i)
              for i, c in enumerate(couples)}
    group = 8 * (2 * 2 * 64 + 2 * 64) + 16 * (64 + 2 * 64)  # 8 rotary pairs of 2 q heads and a k head; 16 v dims
    plan, carry = plan_round(model, scores, fraction=0.2, carry={"attention_parameters": group})
    units = plan.units()
    # the credit covers one group: the least important one (its QK and VO couples scored lowest)
    assert units == {"model.layers.1:qk.1": list(range(8)), "model.layers.1:vo.1": list(range(16))}
    assert 0 < carry["attention_parameters"] < group
    reference = masked(model, couples, units)
    apply_plan(model, plan)
    assert type(model.model.layers[1].self_attn).__name__ == "Qwen3Attention"
    assert model.model.layers[1].self_attn.q_proj.out_features == 32
    x = tokens()
    torch.testing.assert_close(logits(model, x), logits(reference, x), atol=1e-5, rtol=1e-5)
