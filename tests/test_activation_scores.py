"""Activation-aware unit scores (structured/activations.py): hand computations and the planted case
where the weight-only coupled L1 rule removes the only live neurons and the activation rule removes the dead ones."""

from __future__ import annotations

import copy

import pytest
import torch

from sparseforge.errors import ConfigError
from sparseforge.methods import build_train_method
from sparseforge.structured.activations import ActivationStats
from sparseforge.structured.couples import build_couples
from sparseforge.structured.importance import unit_scores
from sparseforge.structured.select import theta_rule
from sparseforge.structured.surgery import apply_plan
from tiny_structured import VOCAB, build

TOKENS = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(0))


def _collect(model, tokens=TOKENS):
    stats = ActivationStats(training_only=False)
    stats.attach(model)
    with torch.no_grad():
        model(tokens)
    stats.detach()
    return stats


def _captured(model, names):
    """The inputs and outputs of the named modules in one forward of TOKENS."""
    seen, handles = {}, []
    for name in names:
        handles.append(model.get_submodule(name).register_forward_hook(
            lambda m, a, o, name=name: seen.__setitem__(name, (a[0].detach().flatten(0, -2), o.detach().flatten(0, -2)))))
    with torch.no_grad():
        model(TOKENS)
    for h in handles:
        h.remove()
    return seen


def _normalised(v):
    return v / v.sum()


def test_ffn_score_is_down_column_norm_times_rms_of_the_swiglu_activation():
    model = build("llama")
    stats = _collect(model)
    mlp = model.model.layers[1].mlp
    x = _captured(model, ["model.layers.1.mlp"])["model.layers.1.mlp"][0]
    with torch.no_grad():
        a = torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)  # the neuron's activation, by hand
    expected = _normalised(mlp.down_proj.weight.double().norm(dim=0) * a.double().pow(2).mean(0).sqrt())
    couple = next(c for c in build_couples(model) if c.name == "model.layers.1:ffn")
    torch.testing.assert_close(stats.unit_scores(model, couple), expected, rtol=1e-5, atol=1e-9)


def test_vo_score_sums_the_query_heads_of_the_group():
    model = build("llama")  # 4 query heads of 16 dims over 2 KV heads: group g serves heads 2g, 2g + 1
    stats = _collect(model)
    o = model.model.layers[0].self_attn.o_proj
    x = _captured(model, ["model.layers.0.self_attn.o_proj"])["model.layers.0.self_attn.o_proj"][0].double()
    rms, norms = x.pow(2).mean(0).sqrt(), o.weight.double().norm(dim=0)
    for g in range(2):
        expected = sum(norms[h * 16:(h + 1) * 16] * rms[h * 16:(h + 1) * 16] for h in (2 * g, 2 * g + 1))
        couple = next(c for c in build_couples(model) if c.name == f"model.layers.0:vo.{g}")
        torch.testing.assert_close(stats.unit_scores(model, couple), _normalised(expected), rtol=1e-5, atol=1e-9)


def test_qk_score_multiplies_rotary_pair_energies_of_query_and_key():
    model = build("llama")
    stats = _collect(model)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    seen = _captured(model, names)
    q_ms = seen[names[0]][1].double().pow(2).mean(0)
    k_ms = seen[names[1]][1].double().pow(2).mean(0)
    g = 1
    expected = torch.zeros(8, dtype=torch.float64)
    for p in range(8):  # pair (p, p + 8) of a 16-dim head
        key = (k_ms[g * 16 + p] + k_ms[g * 16 + p + 8]).sqrt()
        for h in (2 * g, 2 * g + 1):
            expected[p] += (q_ms[h * 16 + p] + q_ms[h * 16 + p + 8]).sqrt() * key
    couple = next(c for c in build_couples(model) if c.name == f"model.layers.0:qk.{g}")
    torch.testing.assert_close(stats.unit_scores(model, couple), _normalised(expected), rtol=1e-5, atol=1e-9)


def test_gpt2_fused_projection_scores_read_the_right_rows():
    model = build("gpt2")  # c_attn stacks q | k | v; Conv1D stores in x out
    stats = _collect(model)
    names = ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"]
    seen = _captured(model, names)
    out_ms = seen[names[0]][1].double().pow(2).mean(0)
    q_ms, k_ms = out_ms[:32], out_ms[32:64]
    head = 2  # 4 heads of 8 dims, no rotary: a unit is one dim
    expected = q_ms[head * 8:(head + 1) * 8].sqrt() * k_ms[head * 8:(head + 1) * 8].sqrt()
    couple = next(c for c in build_couples(model) if c.name == f"transformer.h.0:qk.{head}")
    torch.testing.assert_close(stats.unit_scores(model, couple), _normalised(expected), rtol=1e-5, atol=1e-9)
    x_ms = seen[names[1]][0].double().pow(2).mean(0)
    proj = model.transformer.h[0].attn.c_proj.weight.double()  # in x out: row i is input feature i
    expected = proj[head * 8:(head + 1) * 8].norm(dim=1) * x_ms[head * 8:(head + 1) * 8].sqrt()
    couple = next(c for c in build_couples(model) if c.name == f"transformer.h.0:vo.{head}")
    torch.testing.assert_close(stats.unit_scores(model, couple), _normalised(expected), rtol=1e-5, atol=1e-9)


def _planted():
    """Tiny LLaMA whose layer-0 FFN sees inputs only in hidden coordinates 0..3 (embeddings there, attention output
    zero): neurons 0..23 read coordinates 0..3 with small weights (live, small L1), neurons 24..47 read 4..63 with
    large weights (dead: their input is exactly zero)."""
    model = build("llama", seed=1)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 4:] = 0
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        mlp = model.model.layers[0].mlp
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight[:24, 4:] = 0
            proj.weight[:24, :4] *= 0.5
            proj.weight[24:, :4] = 0
            proj.weight[24:, 4:] = proj.weight[24:, 4:].sign() * 0.3
    return model


def test_planted_dead_neurons_go_first_by_activation_while_l1_removes_the_live_ones():
    model = _planted()
    stats = _collect(model)
    couple = next(c for c in build_couples(model) if c.name == "model.layers.0:ffn")
    by_l1 = set(theta_rule(unit_scores(model, couple), 0.9).tolist())
    scores = stats.unit_scores(model, couple)
    by_activation = set(theta_rule(scores, 0.9).tolist())
    dead = set(range(24, 48))
    assert set(torch.nonzero(scores == 0).flatten().tolist()) == dead
    assert dead <= by_activation  # score 0: all of them fit in 1 - θ, before any live one
    assert set(range(24)) <= by_l1  # the L1 product ranks the small live neurons lowest: every one goes
    with torch.no_grad():
        dense = model(TOKENS).logits
        errors = {}
        for rule, units in (("l1", by_l1), ("activation", by_activation), ("dead", dead)):
            shrunk = copy.deepcopy(model)
            apply_plan(shrunk, {couple.name: sorted(units)}, None, "free")
            errors[rule] = float((shrunk(TOKENS).logits - dense).abs().max())
    assert errors["dead"] < 1e-5 < errors["activation"] < errors["l1"] / 2


def test_evaluation_forwards_are_not_counted_and_reset_forgets():
    model = build("llama")
    stats = ActivationStats()  # training forwards only
    stats.attach(model)
    with torch.no_grad():
        model.eval()(TOKENS)
        assert stats.rows == {}
        model.train()(TOKENS)
    assert set(stats.rows.values()) == {TOKENS.numel()}
    saved = stats.state_dict()
    stats.reset()
    with pytest.raises(ConfigError, match="no activations"):
        stats.unit_scores(model, build_couples(model)[0])
    stats.load_state_dict(saved)
    assert stats.unit_scores(model, build_couples(model)[0]).sum().item() == pytest.approx(1.0)
    stats.detach()
    model(TOKENS)
    assert set(stats.rows.values()) == {TOKENS.numel()}  # detached: nothing more recorded


@pytest.mark.parametrize("options, fragment", [
    ({"unit_score": "fisher"}, "--unit-score 'fisher' unknown"),
    ({"method_name": "structured-l1", "unit_score": "activation"}, "structured-l1 ranks each matrix"),
])
def test_unit_score_settings(options, fragment):
    name = options.pop("method_name", "transpa")
    with pytest.raises(ConfigError, match=fragment):
        build_train_method(name, 10, {"target_params": 0.7, "round_steps": 2, **options})


def test_defaults_activation_for_transpa_and_l1_for_the_ablation():
    assert build_train_method("transpa", 10, {}).config.unit_score == "activation"
    assert build_train_method("structured-l1", 10, {}).config.unit_score == "l1"
