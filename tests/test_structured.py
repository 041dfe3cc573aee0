"""Structured sparsity (TranSpa's core): couples, coupled Fisher / L1, the θ rule and selection,
physical surgery (exact against the masked model), optimizer surgery, uniform export."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from sparseforge.errors import ConfigError
from sparseforge.eval.speed import cache_argument, returned_cache
from sparseforge.structured import (
    CompactAttention,
    CoupledFisher,
    Removal,
    RemovalPlan,
    allowed_group_counts,
    apply_plan,
    block_attention,
    build_couples,
    clamp_plan,
    finest_removal,
    layout_floor,
    magnitude_scores,
    manifest_includes,
    normalize_units,
    plan_parameters,
    plan_round,
    select_couples,
    structured_l1_scores,
    theta_rule,
    tsvd,
    uniform_config,
    unit_cost,
    unit_scores,
)
from tiny_structured import VOCAB, build, masked, random_units

pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def tokens(batch=2, length=10, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x, mask=None):
    with torch.no_grad():
        return model(x, attention_mask=mask).logits


def outputs(model, x, mask=None):
    """The last hidden states and the logits (a classifier's logits alone hide small differences)."""
    with torch.no_grad():
        out = model(x, attention_mask=mask, output_hidden_states=True)
    return torch.cat([out.hidden_states[-1].flatten(), out.logits.flatten()])


def lm_backward(model, seed=0):
    x = tokens(seed=seed)
    model.zero_grad(set_to_none=True)
    model(x, labels=x).loss.backward()


# ------------------------------------------------------------------ couples


def test_llama_couples_index_the_hand_computed_rows():
    model = build("llama")  # 4 query heads, 2 KV heads, head_dim 16: rotary pairs (p, p + 8)
    couples = {c.name: c for c in build_couples(model)}
    assert len(couples) == 2 * (2 + 2 + 1)
    qk = couples["model.layers.0:qk.1"]
    assert qk.units == 8
    q, k = qk.members
    assert (q.layer, q.dim, q.side, k.layer, k.dim, k.side) == (
        "model.layers.0.self_attn.q_proj", 0, 0, "model.layers.0.self_attn.k_proj", 0, 1)
    # group 1 = query heads 2, 3 (rows 32..63) and key head 1 (rows 16..31); pair 3 = dims 3 and 11
    assert q.index[3].tolist() == [35, 43, 51, 59]
    assert k.index[3].tolist() == [19, 27]
    v, o = couples["model.layers.1:vo.1"].members
    assert (v.dim, o.dim, v.index[5].tolist(), o.index[5].tolist()) == (0, 1, [21], [37, 53])
    gate, up, down = couples["model.layers.0:ffn"].members
    assert [(m.dim, m.side) for m in (gate, up, down)] == [(0, 0), (0, 0), (1, 1)]
    assert couples["model.layers.0:ffn"].units == 48


def test_gpt2_fused_couples_index_with_offsets():
    model = build("gpt2")  # 4 heads of 8 dims, c_attn = q | k | v (96 outputs), no rope
    couples = {c.name: c for c in build_couples(model)}
    q, k = couples["transformer.h.0:qk.2"].members
    assert q.layer == k.layer == "transformer.h.0.attn.c_attn"
    assert (q.index[3].tolist(), k.index[3].tolist()) == ([19], [32 + 19])
    v, o = couples["transformer.h.0:vo.2"].members
    assert (v.index[3].tolist(), o.index[3].tolist()) == ([64 + 19], [19])
    # one unit of a QK couple: a q row and a k row of 32 inputs, plus their two bias entries
    assert unit_cost(model, couples["transformer.h.0:qk.2"]) == 2 * 32 + 2


# ------------------------------------------------------------------ importance


def test_coupled_fisher_equals_the_hand_computation():
    model = build("llama")
    fisher = CoupledFisher()
    grads = []
    for seed in (1, 2):
        lm_backward(model, seed)
        fisher.accumulate(model)
        attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
        grads.append({"q": attn.q_proj.weight.grad.clone(), "k": attn.k_proj.weight.grad.clone(),
                      "v": attn.v_proj.weight.grad.clone(), "o": attn.o_proj.weight.grad.clone(),
                      "gate": mlp.gate_proj.weight.grad.clone(), "up": mlp.up_proj.weight.grad.clone(),
                      "down": mlp.down_proj.weight.grad.clone()})
    scores = fisher.scores()

    def mean_sq(t):
        return float(t.double().pow(2).mean())

    # QK of group 1: the rows of query heads 2 and 3 and of key head 1; VO of group 0: v rows 0..15, o columns 0..31
    qk = sum(0.5 * (mean_sq(g["q"][32:64]) + mean_sq(g["k"][16:32])) for g in grads) / 2
    vo = sum(0.5 * (mean_sq(g["v"][0:16]) + mean_sq(g["o"][:, 0:32])) for g in grads) / 2
    ffn = sum((mean_sq(g["gate"]) + mean_sq(g["up"]) + mean_sq(g["down"])) / 3 for g in grads) / 2
    assert scores["model.layers.0:qk.1"] == pytest.approx(qk, rel=1e-6)  # squares in float32, sums in float64
    assert scores["model.layers.0:vo.0"] == pytest.approx(vo, rel=1e-6)
    assert scores["model.layers.0:ffn"] == pytest.approx(ffn, rel=1e-6)
    assert qk != pytest.approx(vo, rel=1e-3)


def test_coupled_fisher_state_resumes_exactly():
    model = build("llama")
    a = CoupledFisher()
    for seed in (1, 2):
        lm_backward(model, seed)
        a.accumulate(model)
    b = CoupledFisher()
    b.load_state_dict(a.state_dict())
    lm_backward(model, 3)
    a.accumulate(model)
    b.accumulate(model)
    assert a.scores() == b.scores() and a.batches == 3


def test_fisher_refuses_changed_shapes_without_reset():
    model = build("llama")
    fisher = CoupledFisher()
    lm_backward(model)
    fisher.accumulate(model)
    apply_plan(model, {"model.layers.0:ffn": [0, 1]})
    lm_backward(model)
    with pytest.raises(ConfigError, match="reset"):
        fisher.accumulate(model)
    fisher.reset()
    fisher.accumulate(model)
    assert fisher.batches == 1


def test_unit_scores_are_the_coupled_l1_products():
    model = build("llama")
    couples = {c.name: c for c in build_couples(model)}
    mlp = model.model.layers[1].mlp
    gate, up, down = (m.weight.detach().double().abs() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    v = (gate.sum(1) + up.sum(1)) * down.sum(0)
    assert torch.allclose(unit_scores(model, couples["model.layers.1:ffn"]), v / v.sum())
    attn = model.model.layers[1].self_attn
    q, k = attn.q_proj.weight.detach().double().abs(), attn.k_proj.weight.detach().double().abs()
    pairs = torch.arange(8)
    q_l1 = sum(q[h * 16 + pairs].sum(1) + q[h * 16 + 8 + pairs].sum(1) for h in (2, 3))
    k_l1 = k[16 + pairs].sum(1) + k[24 + pairs].sum(1)
    v = q_l1 * k_l1
    assert torch.allclose(unit_scores(model, couples["model.layers.1:qk.1"]), v / v.sum())
    # uncoupled baseline: side 0 only (gate + up rows)
    s = gate.sum(1) + up.sum(1)
    assert torch.allclose(structured_l1_scores(model, couples["model.layers.1:ffn"]), s / s.sum())
    # L1-only couple estimation: the mean |w| of each matrix's slice, averaged over the couple's matrices
    assert magnitude_scores(model)["model.layers.1:ffn"] == pytest.approx(float(gate.mean() + up.mean() + down.mean()) / 3)
    assert magnitude_scores(model)["model.layers.1:qk.1"] == pytest.approx(float(q[32:64].mean() + k[16:32].mean()) / 2)


def test_tsvd_is_the_best_low_rank_product():
    g = torch.Generator().manual_seed(0)
    side0, side1 = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    right, left = tsvd(side0, side1, 2)
    assert right.shape == (2, 5) and left.shape == (4, 2)
    s = torch.linalg.svdvals(side1 @ side0)
    assert torch.linalg.matrix_norm(side1 @ side0 - left @ right) ** 2 == pytest.approx(float((s[2:] ** 2).sum()))


# ------------------------------------------------------------------ selection


def test_theta_rule_removes_exactly_the_defined_units():
    v = torch.tensor([0.30, 0.02, 0.05, 0.40, 0.03, 0.20])
    # ascending: 0.02 (1), 0.03 (4), 0.05 (2), 0.20 ...: removing the three keeps exactly 0.90 >= θ
    assert theta_rule(v, 0.9).tolist() == [1, 4, 2]
    assert theta_rule(v, 0.95).tolist() == [1, 4]  # 0.02 + 0.03 = 0.05 <= 0.05; one more would keep 0.90 < 0.95
    assert theta_rule(v, 0.91).tolist() == [1, 4]  # never below θ (the paper's literal loop would take unit 2 too)
    assert theta_rule(v, 1.0).tolist() == []
    assert theta_rule(v * 7, 0.9).tolist() == [1, 4, 2]  # normalised inside
    assert theta_rule(torch.tensor([0.25, 0.25, 0.25, 0.25]), 0.5).tolist() == [0, 1]  # ties: by index
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="theta"):
            theta_rule(v, bad)


def test_select_couples_picks_the_k_fraction_lowest():
    scores = {f"c{i}": s for i, s in enumerate([5.0, 0.1, 3.0, 0.2, 9.0, 0.05, 4.0, 7.0, 8.0, 6.0])}
    assert select_couples(scores, 0.3) == ["c5", "c1", "c3"]
    assert select_couples(scores, 0.25) == ["c5", "c1", "c3"]  # ⌈2.5⌉
    assert select_couples(scores, 0.01) == ["c5"]  # at least one
    assert select_couples({"b": 1.0, "a": 1.0, "c": 0.5}, 0.6) == ["c", "a"]  # ties by name
    with pytest.raises(ConfigError, match="fraction"):
        select_couples(scores, 0)


def test_clamp_plan_keeps_the_cheapest_priorities_until_the_budget():
    model = build("llama")
    ffn = "model.layers.0:ffn"
    assert unit_cost(model, build_couples(model)[4]) == 3 * 64
    plan = RemovalPlan([Removal({ffn: (0,)}, 3.0), Removal({ffn: (1,)}, 1.0), Removal({ffn: (2,)}, 2.0)])
    # each removal 192: the crossing one is taken if it overshoots by no more than its absence falls short
    assert clamp_plan(model, plan, 300).units() == {ffn: [1, 2]}  # 84 over beats 108 short
    assert clamp_plan(model, plan, 200).units() == {ffn: [1]}  # 184 over loses to 8 short: the rest skipped too
    assert clamp_plan(model, plan, 192).units() == {ffn: [1]}
    assert clamp_plan(model, plan, 96).units() == {ffn: [1]}  # a tie goes in
    assert clamp_plan(model, plan, 95).units() == {}
    assert clamp_plan(model, plan, 0).units() == {}
    assert plan_parameters(model, plan) == 3 * 192


def test_a_group_without_values_loses_its_query_key_units_too():
    model = build("llama")
    couples = build_couples(model)
    units = normalize_units(couples, {"model.layers.0:vo.1": list(range(16))})
    assert units["model.layers.0:qk.1"] == list(range(8))
    with pytest.raises(ConfigError, match="current couples"):
        normalize_units(couples, {"model.layers.0:vo.1": [16]})
    with pytest.raises(ConfigError, match="current couples"):
        normalize_units(couples, {"model.layers.9:ffn": [0]})


def _scores(model, low: list[str], high: float = 1.0) -> dict[str, float]:
    """Hand-made couple scores: the named couples lowest, in that order."""
    scores = {c.name: high + i for i, c in enumerate(build_couples(model))}
    scores.update({name: 0.001 * (i + 1) for i, name in enumerate(low)})
    return scores


def test_uniform_rule_spreads_the_free_ffn_removals_over_layers():
    model = build("llama")
    couples = {c.name: c for c in build_couples(model)}
    ffns = ["model.layers.0:ffn", "model.layers.1:ffn"]
    scores = _scores(model, ffns)
    free, _ = plan_round(model, scores, layout="free", fraction=0.2)  # 2 of 10 couples: the FFNs
    counts = [len(theta_rule(unit_scores(model, couples[n]), 0.9)) for n in ffns]
    assert {n: len(u) for n, u in free.units().items()} == dict(zip(ffns, counts))
    uniform, carry = plan_round(model, scores, layout="uniform", fraction=0.2, carry={"ffn_units": 1})
    per_layer = (sum(counts) + 1) // 2
    expected = {n: sorted(torch.sort(unit_scores(model, couples[n]), stable=True).indices[:per_layer].tolist()) for n in ffns}
    assert uniform.units() == expected
    assert carry["ffn_units"] == sum(counts) + 1 - 2 * per_layer
    assert len(uniform) == per_layer  # one removal = one unit in every layer


def test_uniform_rule_removes_whole_groups_once_the_credit_covers_one_per_layer():
    model = build("llama")
    # layer 0: group 1 is less important; layer 1: group 0
    scores = _scores(model, ["model.layers.0:vo.1", "model.layers.0:qk.1", "model.layers.1:qk.0", "model.layers.1:vo.0"])
    couples = build_couples(model)
    group_params = sum(c.units * unit_cost(model, c) for c in couples if c.block == 0 and c.group == 1)
    plan, carry = plan_round(model, scores, layout="uniform", fraction=0.1, carry={"attention_parameters": 0})
    assert not any(":vo." in n for n in plan.units())  # the round's credit is below two groups
    plan, carry = plan_round(model, scores, layout="uniform", fraction=0.1,
                             carry={"attention_parameters": 2 * group_params})
    groups = {n: u for n, u in plan.units().items() if ":ffn" not in n}
    assert groups == {"model.layers.0:qk.1": list(range(8)), "model.layers.0:vo.1": list(range(16)),
                      "model.layers.1:qk.0": list(range(8)), "model.layers.1:vo.0": list(range(16))}
    vo = next(c for c in couples if c.name == "model.layers.0:vo.1")
    round_credit = len(theta_rule(unit_scores(model, vo), 0.9)) * unit_cost(model, vo)
    assert carry == {"ffn_units": 0.0, "attention_parameters": float(round_credit)}
    apply_plan(model, plan)
    assert uniform_config(model) == {"intermediate_size": 48, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}


def _group_counts(model) -> set[int]:
    return {block_attention(model, i).layout.num_groups for i in range(len(model.model.layers))}


def _one_group_cost(model) -> int:
    return sum(c.units * unit_cost(model, c) for c in build_couples(model) if c.block == 0 and c.group == 0)


class _RefusingConfig:
    """A config class that refuses every construction (one that cannot be rebuilt from its own dict)."""

    def __init__(self, **kwargs):
        raise TypeError("unexpected keyword")


def test_allowed_group_counts_are_the_counts_the_config_class_accepts():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from sparseforge.structured.plain_config import _accepted_counts

    assert allowed_group_counts(build("llama-8x4")) == (1, 2, 4)  # 3 groups = 6 heads do not divide hidden 64
    assert allowed_group_counts(build("smol-like")) == (1, 2, 3)  # 9, 6, 3 heads all divide hidden 36
    assert allowed_group_counts(build("llama")) == (1, 2)
    assert allowed_group_counts(build("opt")) == (4,)  # head size = hidden / heads: a plain OPT keeps its heads
    # Qwen3's config does not check hidden % heads: asked, it accepts every count
    qwen3 = Qwen3ForCausalLM(Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=24, num_hidden_layers=1,
                                         num_attention_heads=8, num_key_value_heads=4, head_dim=8))
    assert allowed_group_counts(qwen3) == (1, 2, 3, 4)
    # a class that cannot be asked: the heads must divide hidden_size (2 heads per group, hidden 12: 2, 4, 6 heads)
    assert _accepted_counts(_RefusingConfig, '{"hidden_size": 12}', "num_attention_heads", "num_key_value_heads", 2, 4) \
        == (1, 2, 3)


def test_uniform_groups_step_to_the_next_count_the_config_accepts():
    model = build("llama-8x4")
    # least important groups: layer 0 groups 3 then 1, layer 1 groups 0 then 2
    order = ["model.layers.0:vo.3", "model.layers.0:qk.3", "model.layers.0:vo.1", "model.layers.0:qk.1",
             "model.layers.1:vo.0", "model.layers.1:qk.0", "model.layers.1:vo.2", "model.layers.1:qk.2"]
    scores = _scores(model, order)
    group = _one_group_cost(model)
    free, _ = plan_round(model, scores, layout="free", fraction=0.1)
    round_credit = plan_parameters(model, free)  # the θ rule's units on the two selected attention couples
    assert 0 < round_credit < group
    # one group per layer is paid for, but 3 groups is a count LlamaConfig refuses: the credit waits
    plan, carry = plan_round(model, scores, layout="uniform", fraction=0.1, carry={"attention_parameters": 2 * group})
    assert not plan.items and carry["attention_parameters"] == 2 * group + round_credit
    plan, carry = plan_round(model, scores, layout="uniform", fraction=0.1, carry={"attention_parameters": 4 * group})
    assert len(plan) == 1 and carry["attention_parameters"] == round_credit  # one removal: the step 4 -> 2
    assert set(plan.units()) == set(order)
    apply_plan(model, plan)
    assert _group_counts(model) == {2}
    assert uniform_config(model) == {"intermediate_size": 24, "num_attention_heads": 4, "num_key_value_heads": 2,
                                     "head_dim": 8}
    # then 2 -> 1 for one group per layer
    plan, _ = plan_round(model, _scores(model, []), layout="uniform", fraction=0.1, carry={"attention_parameters": 2 * group})
    apply_plan(model, plan)
    assert _group_counts(model) == {1}


def test_two_group_steps_in_one_round_are_trimmed_in_order():
    model = build("llama-8x4")
    group = _one_group_cost(model)
    # group importance: groups 0 and 1 0.1, group 2 0.15 (in both layers), group 3 over 1: the step 2 -> 1
    # (group 2, mass 2 x 0.15) removes less mass than the step 4 -> 2 (groups 0 and 1, mass 4 x 0.1)
    scores = _scores(model, [])
    scores.update({f"model.layers.{b}:{k}.{g}": 0.05 for g in (0, 1) for b in (0, 1) for k in ("vo", "qk")})
    scores.update({f"model.layers.{b}:{k}.2": 0.075 for b in (0, 1) for k in ("vo", "qk")})
    plan, _ = plan_round(model, scores, layout="uniform", fraction=0.05, carry={"attention_parameters": 6 * group})
    steps = [i for i in plan.items if ":ffn" not in next(iter(i.units))]
    assert [len(i.units) // 2 for i in steps] == [4, 2]  # groups per step (QK + VO couples per group), both layers
    assert steps[0].priority == pytest.approx(0.4) and steps[1].priority == steps[0].priority  # never before step 1
    # a budget the step 2 -> 1 alone would meet: the step 4 -> 2 overshoots it by 3 groups, so neither goes
    assert clamp_plan(model, RemovalPlan(steps), group).items == []
    trimmed = clamp_plan(model, RemovalPlan(steps), 3 * group)  # 4 -> 2 is one group over, 3 short without it
    assert trimmed.items == steps[:1]
    apply_plan(model, trimmed, layout="uniform")
    assert _group_counts(model) == {2}


def test_smollm2_like_heads_still_go_one_group_at_a_time():
    model = build("smol-like")
    group = _one_group_cost(model)
    counts = []
    for _ in range(3):
        plan, _ = plan_round(model, _scores(model, []), layout="uniform", fraction=0.05,
                             carry={"attention_parameters": 2 * group})
        apply_plan(model, plan, layout="uniform")
        counts.append(_group_counts(model))
    assert counts == [{2}, {1}, {1}]  # never below one group
    assert uniform_config(model)["num_attention_heads"] == 3


def test_uniform_config_refuses_a_group_count_the_config_refuses():
    model = build("llama-8x4")
    units = {c.name: list(range(c.units)) for c in build_couples(model) if c.group == 0}
    apply_plan(model, units, layout="uniform")  # 3 groups: a hand-made plan, not plan_round's
    with pytest.raises(ConfigError, match=r"refuses 3 KV groups \(6 heads of 8\); it accepts 1, 2, 4") as error:
        uniform_config(model)
    assert "\n" not in str(error.value)


def test_layout_floor_is_the_hand_computed_smallest_model():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    # LLaMA (hidden 64, FFN 48, 2 groups of 2 heads of 16, 2 blocks): an FFN unit is 3 x 64; a group is
    # q 2 x 16 x 64 + k, v 16 x 64 + o 64 x 32 = 6144; a QK unit (a rotary pair) 6 rows of 64, a VO unit 64 + 2 x 64
    model = build("llama")
    total, ffn = n_params(model), 47 * 192
    assert layout_floor(model, "uniform") == total - 2 * (ffn + 6144)  # one group, FFN width 1
    assert layout_floor(model, "free") == total - 2 * (ffn + 2 * (7 * 384 + 15 * 192))  # one unit per couple
    # 8 heads of 8 in 4 groups: uniform goes down to 1 group (a group: q 2 x 8 x 64 + k, v 8 x 64 + o 64 x 16 = 3072)
    model = build("llama-8x4")
    assert layout_floor(model, "uniform") == n_params(model) - 2 * (23 * 192 + 3 * 3072)
    # BERT (hidden 32, FFN 48): the uniform layout keeps every head; an FFN unit is up row + bias + down column
    model = build("bert")
    assert layout_floor(model, "uniform") == n_params(model) - 2 * 47 * 65
    # Qwen3 runs no per-group sizes (q/k norms): the free layout keeps one whole group per layer
    torch.manual_seed(0)
    qwen3 = Qwen3ForCausalLM(Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=24, num_hidden_layers=2,
                                         num_attention_heads=8, num_key_value_heads=4, head_dim=8))
    assert layout_floor(qwen3, "free") == n_params(qwen3) - 2 * (23 * 192 + 3 * 3072)


# ------------------------------------------------------------------ surgery: exact against the masked model


def _mask_for(name, batch=2, length=10):
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :3] = 0  # left padding (decoders) / padding (encoder) in the first row
    return mask


def _check_exact(name, units, layout, expect_compact):
    model = build(name)
    couples = build_couples(model)
    reference = masked(model, couples, normalize_units(couples, units))
    x, mask = tokens(), _mask_for(name)
    assert not torch.allclose(outputs(model, x, mask), outputs(reference, x, mask), atol=1e-2)  # the plan matters
    expected = plan_parameters(model, units)
    total = n_params(model)
    report = apply_plan(model, units, layout=layout)
    assert n_params(model) == total - expected == total - report.removed_parameters
    compact = [type(model.get_submodule(name)) is CompactAttention for name in report.attention]
    assert compact and all(c == expect_compact for c in compact)
    torch.testing.assert_close(outputs(model, x, mask), outputs(reference, x, mask), atol=1e-5, rtol=1e-5)
    model.train()  # the shrunk model trains: every shrunk layer gets a gradient of its new shape
    out = model(x, attention_mask=mask, labels=torch.tensor([0, 2]) if name == "bert" else x)
    out.loss.backward()
    for layer in report.layers:
        weight = model.get_submodule(layer).weight
        assert weight.grad is not None and weight.grad.shape == weight.shape
    return model


@pytest.mark.parametrize("name", ["llama", "llama-bias", "opt", "gpt2", "bert"])
def test_free_layout_surgery_equals_the_masked_model(name):
    # random partial QK pairs / V dims per group and FFN units; block 0's group 1 keeps V but no QK
    # (uniform attention); block 1 loses group 0 whole
    model = build(name)
    units = random_units(build_couples(model), seed=3, whole_groups={1: [0]}, qk_empty={(0, 1)})
    _check_exact(name, units, "free", expect_compact=True)


@pytest.mark.parametrize("name", ["llama-bias", "opt", "gpt2", "bert"])
def test_uniform_layout_surgery_equals_the_masked_model(name):
    # the same number of whole KV groups and FFN units in every layer; stock attention modules
    model = build(name)
    couples = build_couples(model)
    units = {c.name: list(range(c.units)) for c in couples if c.group == (1 if c.block == 0 else 0)}
    for c in couples:
        if c.kind == "ffn":
            units[c.name] = sorted(torch.randperm(c.units, generator=torch.Generator().manual_seed(c.block))[:10].tolist())
    model = _check_exact(name, units, "uniform", expect_compact=False)
    if name == "llama-bias":
        assert uniform_config(model) == {"intermediate_size": 38, "num_attention_heads": 2, "num_key_value_heads": 1,
                                         "head_dim": 16}


def test_free_layout_surgery_composes_over_rounds():
    model = build("llama")
    x = tokens()
    for seed in range(3):
        couples = build_couples(model)
        units = random_units(couples, seed=seed, fraction=0.25)
        reference = masked(model, couples, normalize_units(couples, units))
        apply_plan(model, units)
        torch.testing.assert_close(logits(model, x), logits(reference, x), atol=1e-5, rtol=1e-5)
    layout = model.model.layers[0].self_attn.layout
    assert layout.qk_units(0) < 8 and layout.v_dim(0) < 16  # three rounds of partial removal


def test_surgery_refuses_partial_groups_in_the_uniform_layout():
    model = build("llama")
    with pytest.raises(ConfigError, match="whole groups"):
        apply_plan(model, {"model.layers.0:qk.0": [1]}, layout="uniform")
    with pytest.raises(ConfigError, match="different sizes"):
        apply_plan(model, {"model.layers.0:ffn": [1]}, layout="uniform")
    with pytest.raises(ConfigError, match="every KV group"):
        apply_plan(model, {f"model.layers.0:vo.{g}": list(range(16)) for g in (0, 1)})
    assert n_params(model) == n_params(build("llama"))  # refused plans change nothing


@pytest.mark.parametrize("name", ["llama", "opt", "gpt2"])
def test_kv_cache_decoding_equals_the_full_forward_on_the_free_layout(name):
    model = build(name)
    apply_plan(model, random_units(build_couples(model), seed=5, whole_groups={1: [1]}, qk_empty={(0, 0)}))
    x = tokens(batch=2, length=8, seed=4)
    full = logits(model, x)
    with torch.no_grad():
        out = model(x[:, :5], use_cache=True)
        steps = [out.logits[:, -1]]
        cache = returned_cache(out)
        for t in range(5, 8):
            out = model(x[:, t:t + 1], use_cache=True, **{cache_argument(model): cache})
            cache = returned_cache(out)
            steps.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps[:-1], 1), full[:, 4:7], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(steps[-1], full[:, 7], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ optimizer surgery


def _kept_index(couples, units):
    """(layer, dim) -> kept indices, from the couples' members."""
    removed = {}
    for name, us in units.items():
        for m in next(c for c in couples if c.name == name).members:
            removed.setdefault((m.layer, m.dim), set()).update(m.index[us].flatten().tolist())
    return removed


def test_optimizer_state_follows_the_surgery():
    from accelerate import Accelerator

    model = build("llama-bias")
    params = list(model.parameters())
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=1e-2)
    model, optimizer = Accelerator(cpu=True).prepare(model, optimizer)
    for seed in range(3):
        lm_backward(model, seed)
        optimizer.step()
    inner = optimizer.optimizer
    couples = build_couples(model)
    units = normalize_units(couples, random_units(couples, seed=7, whole_groups={0: [1]}, qk_empty={(1, 0)}))
    reference = masked(model, couples, units)
    ref_params = list(reference.parameters())
    ref_opt = torch.optim.AdamW([{"params": [p for p in ref_params if p.ndim >= 2], "weight_decay": 0.1},
                                 {"params": [p for p in ref_params if p.ndim < 2], "weight_decay": 0.0}], lr=1e-2)
    ref_opt.load_state_dict(copy.deepcopy(inner.state_dict()))  # load_state_dict would share the tensors
    names = dict(model.named_parameters())
    before = {n: {k: v.clone() for k, v in inner.state[p].items()} for n, p in names.items()}
    removed = _kept_index(couples, units)

    def kept(name, shape):
        """Per dim of parameter ``name`` (pre-surgery ``shape``): the kept indices."""
        layer, kind = name.rsplit(".", 1)
        out = []
        for dim, size in enumerate(shape):
            rows = removed.get((layer, dim), set()) if (kind == "weight" or dim == 0) else set()
            out.append(torch.tensor([j for j in range(size) if j not in rows]))
        return out

    def keep(name, tensor):
        for dim, index in enumerate(kept(name, tensor.shape)):
            tensor = tensor.index_select(dim, index)
        return tensor

    apply_plan(model, units, optimizer)
    grouped = [p for g in inner.param_groups for p in g["params"]]
    assert sorted(map(id, grouped)) == sorted(map(id, params)) == sorted(map(id, model.parameters()))  # the same objects
    for n, p in model.named_parameters():
        state = inner.state[p]
        assert torch.equal(state["step"], before[n]["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[key].shape == p.shape
            assert torch.equal(state[key], keep(n, before[n][key]))  # bit-identical kept entries
    # one more step: the shrunk model vs the masked model whose removed gradients are zeroed
    lm_backward(model, 9)
    lm_backward(reference, 9)
    ref = dict(reference.named_parameters())
    with torch.no_grad():
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, keep(n, ref[n].grad), atol=1e-6, rtol=1e-5)
            grad = torch.zeros_like(ref[n].grad)  # the removed entries' gradients zeroed
            index = torch.meshgrid(*kept(n, grad.shape), indexing="ij")
            grad[index] = ref[n].grad[index]
            ref[n].grad = grad
    optimizer.step()
    ref_opt.step()
    # Adam divides by √v: float noise of 1e-8 in a gradient moves a weight by ~1e-6; a wrong moment would move it by ~lr
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), keep(n, ref[n].detach()), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------ export


def test_uniform_export_reloads_as_a_plain_hf_model(tmp_path):
    model = build("llama-bias")
    couples = build_couples(model)
    units = {c.name: list(range(c.units)) for c in couples if c.group == c.block}  # group 0 in block 0, group 1 in block 1
    units.update({c.name: list(range(0, 2 * c.block + 8)) for c in couples if c.kind == "ffn"})
    with pytest.raises(ConfigError, match="different sizes"):
        apply_plan(model, units, layout="uniform")
    units.update({c.name: list(range(5, 15)) for c in couples if c.kind == "ffn"})
    apply_plan(model, units, layout="uniform")
    model.config.update(uniform_config(model))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert n_params(reloaded) == n_params(model)
    x = tokens()
    torch.testing.assert_close(logits(reloaded, x), logits(model, x), atol=1e-6, rtol=1e-6)


def test_uniform_config_refuses_what_a_plain_checkpoint_cannot_hold():
    model = build("llama")
    apply_plan(model, {"model.layers.0:qk.0": [2]})
    with pytest.raises(ConfigError, match="manifest"):
        uniform_config(model)
    opt = build("opt")
    couples = build_couples(opt)
    apply_plan(opt, {c.name: [0, 1] for c in couples if c.kind == "ffn"}, layout="uniform")
    assert uniform_config(opt) == {"ffn_dim": 46}
    apply_plan(opt, {c.name: list(range(c.units)) for c in build_couples(opt) if c.group == 0}, layout="uniform")
    with pytest.raises(ConfigError, match="head size"):
        uniform_config(opt)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_free_layout_rebuilds_from_the_structure_manifest(name):
    from sparseforge.models.modules import apply_structure, structure_manifest

    model = build(name)
    apply_plan(model, random_units(build_couples(model), seed=11, whole_groups={0: [2] if name != "llama" else [1]}))
    manifest = structure_manifest(model, include=manifest_includes(model))
    assert any(s["class"] == "CompactAttention" for s in manifest["modules"].values())
    if name == "gpt2":
        assert any(s["class"] == "Conv1D" for s in manifest["modules"].values())
    fresh = build(name, seed=1)
    apply_structure(fresh, manifest)
    fresh.load_state_dict(model.state_dict())
    x = tokens()
    torch.testing.assert_close(logits(fresh, x), logits(model, x), atol=0, rtol=0)
    assert type(fresh.get_submodule(next(iter(manifest["modules"])))) is not Conv1D


# ------------------------------------------------------------------ rounds to a target


@pytest.mark.parametrize("layout", ["free", "uniform"])
def test_rounds_reach_the_target_within_half_a_removal(layout):
    model = build("llama")
    target = int(0.85 * n_params(model))
    finest = finest_removal(model, layout)
    assert finest == (2 if layout == "uniform" else 1) * 3 * 64  # gate, up, down of 64: one unit, or one per layer
    fisher, carry, biggest = CoupledFisher(), None, 0
    for round_ in range(30):
        if n_params(model) <= target + finest // 2:
            break
        for seed in range(2):
            lm_backward(model, 100 * round_ + seed)
            fisher.accumulate(model)
        plan, carry = plan_round(model, fisher.scores(), layout=layout, theta=0.7, carry=carry)
        assert plan.items or layout == "uniform"
        plan = clamp_plan(model, plan, n_params(model) - target)
        costs = {c.name: unit_cost(model, c) for c in build_couples(model)}
        biggest = max([biggest] + [sum(len(u) * costs[n] for n, u in i.units.items()) for i in plan.items])
        apply_plan(model, plan)
        fisher.reset()
    assert -biggest / 2 <= n_params(model) - target <= finest / 2
    if layout == "uniform":
        config = uniform_config(model)
        assert config["head_dim"] == 16 and config["num_attention_heads"] == 2 * config["num_key_value_heads"]
    else:
        assert any(isinstance(layer.self_attn, CompactAttention) for layer in model.model.layers)
        assert math.isfinite(float(logits(model, tokens()).sum()))
