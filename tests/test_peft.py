"""SPP and LoRA adapter layers: forward forms, merging, the zero pattern, the parameter budget."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from sparseforge.errors import ConfigError
from sparseforge.models.base import get_weight
from sparseforge.peft import (
    AdapterConfig,
    LoRALinear,
    SPPLinear,
    adapter_layers,
    compare_masks,
    inject_adapters,
    lora_rank_for_budget,
    merge_adapters,
    rows_per_block,
    target_layers,
    trainable_report,
    zero_masks,
)
from tiny import VOCAB

G = torch.Generator().manual_seed(0)


def sparse_linear(out_features=48, in_features=32, sparsity=0.5, bias=True, dtype=torch.float64):
    layer = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(layer.weight.shape, generator=G, dtype=dtype) >= sparsity)
    return layer


def randomise(layer):
    """Non-zero adapter parameters, as after some training steps."""
    with torch.no_grad():
        for p in layer.adapter_parameters().values():
            p.copy_(torch.randn(p.shape, generator=G, dtype=p.dtype))


def prune_model(model, sparsity=0.5):
    with torch.no_grad():
        for module in target_layers(model).values():
            w = module.weight
            w.mul_(torch.rand(w.shape, generator=G) >= sparsity)


def test_all_forward_forms_agree():
    layer = SPPLinear(sparse_linear(), rank=4, scale=0.7)
    randomise(layer)
    x = torch.randn(3, 5, 32, generator=G, dtype=torch.float64)
    expected = x @ (layer.weight + 0.7 * layer.alpha.repeat_interleave(12, 0) * layer.beta[:, None] * layer.weight).T
    expected = expected + layer.base.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-10, rtol=0)  # the training form
    torch.testing.assert_close(layer.blockwise_forward(x), expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(layer.naive_forward(x), expected, atol=1e-10, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-10, rtol=0)  # no grad: block-wise
    assert (layer(x) - layer.base(x)).abs().max() > 1e-3  # the delta is really there


def test_blockwise_forward_float32_within_1e5():
    layer = SPPLinear(sparse_linear(dtype=torch.float32), rank=16)
    randomise(layer)
    x = torch.randn(7, 32, generator=G)
    assert (layer.blockwise_forward(x) - layer.naive_forward(x)).abs().max() < 1e-5


@pytest.mark.parametrize("bias", [True, False])
def test_training_form_gradients_match_autograd_of_the_naive_form(bias):
    layer = SPPLinear(sparse_linear(out_features=12, in_features=6, bias=bias), rank=3, scale=0.5)
    randomise(layer)
    if bias:
        layer.base.bias.requires_grad_(True)
    x = torch.randn(2, 4, 6, generator=G, dtype=torch.float64, requires_grad=True)
    params = [x, layer.alpha, layer.beta] + ([layer.base.bias] if bias else [])
    # gradcheck perturbs the parameters in place, so the layer sees each perturbation
    assert torch.autograd.gradcheck(lambda x_, *_: layer(x_), params)
    upstream = torch.randn(2, 4, 12, generator=G, dtype=torch.float64)
    fast = torch.autograd.grad((layer(x) * upstream).sum(), params)
    slow = torch.autograd.grad((layer.naive_forward(x) * upstream).sum(), params)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_spp_weight_is_the_direct_expression_bit_for_bit():
    """The in-place, broadcast W' must be exactly W + scale·A⊙β⊙W (the same float operations)."""
    from sparseforge.peft.layers import _spp_weight

    for dtype in (torch.float32, torch.float64):
        w = torch.randn(48, 20, generator=G, dtype=dtype)
        alpha, beta = torch.randn(4, 20, generator=G, dtype=dtype), torch.randn(48, generator=G, dtype=dtype)
        for scale in (1.0, 0.37):
            direct = w + scale * alpha.repeat_interleave(12, dim=0) * beta[:, None] * w
            assert torch.equal(_spp_weight(w, alpha, beta, scale, 12), direct)
        assert torch.equal(_spp_weight(w.T.contiguous().T, alpha, beta, 1.0, 12), _spp_weight(w, alpha, beta, 1.0, 12))


def test_training_form_keeps_only_the_input_for_backward():
    """The memory claim: nothing out x in (or r copies of x) is saved per layer."""
    layer = SPPLinear(sparse_linear(out_features=64, in_features=32, dtype=torch.float32), rank=16)
    randomise(layer)
    x = torch.randn(256, 32, generator=G)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    assert sum(t.numel() for t in saved) <= x.numel() + 2 * (64 * 32 + 16 * 32 + 64)  # x, W, α, β
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer.blockwise_forward(x)
    assert sum(t.numel() for t in saved) >= 16 * x.numel()  # what the block-wise form would keep


def test_delta_keeps_every_zero_and_merge_is_exact():
    layer = SPPLinear(sparse_linear(), rank=8)
    randomise(layer)
    before = layer.weight == 0
    x = torch.randn(6, 32, generator=G, dtype=torch.float64)
    unmerged = layer(x)
    assert (layer.delta_weight()[before] == 0).all()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), unmerged, atol=1e-10, rtol=0)
    assert torch.equal(layer.weight == 0, before)
    layer.unmerge()
    torch.testing.assert_close(layer(x), unmerged, atol=1e-10, rtol=0)


def test_merge_and_unload_keeps_no_copy_of_the_weights(tiny_model):
    """Unloading is the end of the adapter: a kept copy of every base weight would double the
    merged model's memory."""
    wrapped = inject_adapters(tiny_model, AdapterConfig(method="spp", spp_rank=4))
    merge_adapters(tiny_model)
    assert wrapped and not any(hasattr(layer, "_unmerged") for layer in wrapped.values())
    layer = next(iter(wrapped.values()))
    with pytest.raises(ConfigError, match="cannot be unmerged"):
        layer.unmerge()


def test_beta_starts_at_zero_so_the_output_is_the_base_output():
    layer = SPPLinear(sparse_linear(), rank=4)
    assert (layer.beta == 0).all() and layer.alpha.abs().sum() > 0
    x = torch.randn(4, 32, generator=G, dtype=torch.float64)
    assert torch.equal(layer(x), layer.base(x))


def test_rows_not_divisible_use_the_largest_divisor(caplog):
    layer = SPPLinear(sparse_linear(out_features=30), rank=16)  # 30 = 15 x 2: 15 blocks of 2 rows
    assert (layer.rank, layer.rows) == (15, 2)
    assert "not divisible" in caplog.text
    randomise(layer)
    x = torch.randn(4, 32, generator=G, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer.naive_forward(x), atol=1e-10, rtol=0)


def test_conv1d_base_layer():
    """GPT-2 stores its weight (in x out); the adapter works in (out x in) through the model adapter."""
    base = Conv1D(48, 32).double()
    with torch.no_grad():
        base.weight.mul_(torch.rand(base.weight.shape, generator=G, dtype=torch.float64) >= 0.5)
    layer = SPPLinear(base, rank=4)
    randomise(layer)
    x = torch.randn(5, 32, generator=G, dtype=torch.float64)
    zeros = base.weight == 0
    torch.testing.assert_close(layer(x), layer.naive_forward(x), atol=1e-10, rtol=0)
    torch.testing.assert_close(layer.blockwise_forward(x), layer.naive_forward(x), atol=1e-10, rtol=0)
    out = layer(x)
    layer.merge()
    torch.testing.assert_close(base(x), out, atol=1e-10, rtol=0)
    assert torch.equal(base.weight == 0, zeros)


def test_lora_star_remasks_and_plain_lora_does_not():
    for keep_mask in (True, False):
        layer = LoRALinear(sparse_linear(), rank=4, keep_mask=keep_mask)
        randomise(layer)
        before = layer.weight == 0
        layer.merge()
        after = layer.weight == 0
        if keep_mask:
            assert torch.equal(after, before)  # sparsity restored exactly
        else:
            assert after.sum() < 0.01 * before.sum()  # the merge fills the zeros in


def test_lora_forward_is_the_low_rank_delta():
    layer = LoRALinear(sparse_linear(), rank=3, lora_alpha=6.0, keep_mask=False)
    randomise(layer)
    x = torch.randn(4, 32, generator=G, dtype=torch.float64)
    expected = layer.base(x) + x @ (2.0 * layer.lora_b @ layer.lora_a).T
    torch.testing.assert_close(layer(x), expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("method", ["spp", "lora-star"])
def test_model_logits_unchanged_at_init_and_merge_equals_unmerged(tiny_model, method):
    prune_model(tiny_model)
    ids = torch.randint(0, VOCAB, (2, 16), generator=G)
    with torch.no_grad():
        pruned_logits = tiny_model(ids).logits
    masks = zero_masks(tiny_model)
    inject_adapters(tiny_model, AdapterConfig(method=method))
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(ids).logits, pruned_logits, atol=1e-6, rtol=0)
    for layer in adapter_layers(tiny_model).values():
        randomise(layer)
        with torch.no_grad():
            for p in layer.adapter_parameters().values():
                p.mul_(0.05)
    if method == "spp":
        with torch.no_grad():
            unmerged = tiny_model(ids).logits
    merge_adapters(tiny_model)
    assert not adapter_layers(tiny_model)
    assert compare_masks(masks, zero_masks(tiny_model))["identical"]
    if method == "spp":
        with torch.no_grad():
            torch.testing.assert_close(tiny_model(ids).logits, unmerged, atol=1e-5, rtol=0)
            assert (unmerged - pruned_logits).abs().max() > 1e-4  # the adapters really act


def test_targets_only_the_block_linears_and_freezes_the_rest(tiny_model):
    wrapped = inject_adapters(tiny_model, AdapterConfig(method="spp"))
    assert len(wrapped) == len(target_layers(tiny_model))
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".alpha", ".beta")) for n in trainable)
    report = trainable_report(tiny_model)
    assert report["trainable"] == sum(p.numel() for n, p in tiny_model.named_parameters() if n in trainable)
    assert 0 < report["per_mille"] < 1000


def test_target_subset_and_unknown_target(tiny_model):
    names = target_layers(tiny_model)
    first = next(iter(names)).rsplit(".", 1)[-1]
    subset = target_layers(tiny_model, (first,))
    assert 0 < len(subset) < len(names)
    with pytest.raises(ConfigError, match="not in the blocks"):
        target_layers(tiny_model, ("no_such_proj",))


def test_lora_rank_matches_the_spp_budget(tiny_model):
    layers = target_layers(tiny_model)
    shapes = [get_weight(m).shape for m in layers.values()]
    spp = sum(rows_per_block(o, 16)[0] * i + o for o, i in shapes)
    rank = lora_rank_for_budget(layers, 16)
    inject_adapters(tiny_model, AdapterConfig(method="lora-star"))
    lora = trainable_report(tiny_model)["trainable"]
    per_rank = sum(o + i for o, i in shapes)
    assert lora == rank * per_rank
    assert abs(lora - spp) <= per_rank / 2  # the nearest rank


def test_bad_adapter_settings():
    with pytest.raises(ConfigError, match="unknown"):
        AdapterConfig(method="dora")
    with pytest.raises(ConfigError, match="positive"):
        AdapterConfig(rank=0)


def test_injecting_twice_is_refused(tiny_model):
    inject_adapters(tiny_model, AdapterConfig())
    with pytest.raises(ConfigError, match="already"):
        inject_adapters(tiny_model, AdapterConfig())
