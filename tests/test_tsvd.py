"""The tSVD ablation: the coupled product's spectrum, the rotation into its SVD basis (exact for
linear couples), truncation = Eckart-Young, the pinned rotary basis, the moments' reset, the run."""

from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from sparseforge.errors import ConfigError
from sparseforge.methods import build_train_method, method_names
from sparseforge.structured import apply_plan, build_couples, theta_rule, tsvd, unit_scores
from sparseforge.structured.truncated_svd import (
    pinned,
    rotate_couple,
    rotate_couples,
    side_matrices,
    spectrum,
    strength,
)
from tiny_structured import VOCAB, build

pytestmark = pytest.mark.usefixtures("one_thread")


def tokens(seed=0):
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(seed))


def outputs(model, x):
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
    return torch.cat([out.hidden_states[-1].flatten(), out.logits.flatten()])


def couple(model, name):
    return next(c for c in build_couples(model) if c.name == name)


def vo_product(model, block=0, group=1):
    """The group's value-output product built from the weights by head slicing: the query heads' O blocks stacked,
    times the group's V rows with their bias column."""
    attn = model.model.layers[block].self_attn
    hd, rep = 16, 2
    v = attn.v_proj.weight[group * hd:(group + 1) * hd].double()
    if attn.v_proj.bias is not None:
        v = torch.cat([v, attn.v_proj.bias[group * hd:(group + 1) * hd, None].double()], 1)
    o = torch.cat([attn.o_proj.weight[:, h * hd:(h + 1) * hd] for h in range(group * rep, (group + 1) * rep)]).double()
    return o @ v


@pytest.mark.parametrize("name", ["llama", "llama-bias"])
def test_strength_is_the_singular_values_of_the_hand_built_product(name):
    model = build(name)
    sigma = torch.linalg.svdvals(vo_product(model))[:16]  # the product has rank 16 at most
    torch.testing.assert_close(strength(model, couple(model, "model.layers.0:vo.1")), sigma)


@pytest.mark.parametrize("name, couple_name", [("llama", "model.layers.0:vo.1"), ("llama", "model.layers.1:ffn"),
                                               ("llama", "model.layers.0:qk.0"), ("gpt2", "transformer.h.1:qk.3")])
def test_the_theta_rule_removes_as_many_units_as_on_the_l1_masses_the_weakest_directions(name, couple_name):
    model = build(name)
    c = couple(model, couple_name)
    v, l1 = spectrum(model, c), unit_scores(model, c)
    torch.testing.assert_close(torch.sort(v).values, torch.sort(l1).values, atol=1e-11, rtol=0)  # the same masses
    by_strength = v[torch.sort(strength(model, c), descending=True, stable=True).indices]
    assert torch.all(by_strength[:-1] > by_strength[1:])  # strongest direction, largest mass
    for theta in (0.5, 0.8, 0.9, 0.97):
        removed = theta_rule(v, theta)
        assert len(removed) == len(theta_rule(l1, theta))
        weakest = torch.sort(strength(model, c), stable=True).indices[:len(removed)]
        assert sorted(removed.tolist()) == sorted(weakest.tolist())


@pytest.mark.parametrize("name", ["llama-bias", "gpt2", "opt", "bert"])
def test_rotating_linear_couples_keeps_the_models_function(name):
    """VO couples (and QK without rotary embeddings) are linear across their inner dimension: the SVD basis
    computes the same function, with biases, fused projections and Conv1D."""
    model = build(name)
    x = tokens()
    before = outputs(model, x)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    free = [c for c in build_couples(model) if c.kind != "ffn" and not pinned(model, c)]
    assert free and {c.kind for c in free} == ({"vo"} if name.startswith("llama") else {"qk", "vo"})
    assert rotate_couples(model, {c.name: [0] for c in free}) == [c.name for c in free]
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, weights[k])}
    assert {layer + ".weight" for c in free for layer in c.layers} <= changed  # every rotated matrix moved
    torch.testing.assert_close(outputs(model, x), before, atol=2e-5, rtol=1e-4)


def test_rotation_puts_the_singular_directions_in_descending_order():
    model = build("llama-bias")
    c = couple(model, "model.layers.1:vo.0")
    product = vo_product(model, 1, 0)
    rotate_couple(model, c)
    a0, a1 = side_matrices(model, c)
    torch.testing.assert_close(a1.T @ a0, product)  # the product is unchanged
    norms = a0.norm(dim=1) * a1.norm(dim=1)  # balanced factors: row u of each side has norm √σ_u
    torch.testing.assert_close(norms, torch.linalg.svdvals(product)[:16])
    assert torch.all(norms[:-1] >= norms[1:])


def test_truncation_is_the_best_product_of_its_rank_and_beats_coupled_l1_removal():
    model = build("llama")
    c = couple(model, "model.layers.0:vo.0")
    product = vo_product(model, 0, 0).detach()
    keep = 6
    by_l1 = build("llama")  # the same weights, the coupled L1 rule's units removed instead
    order = torch.sort(unit_scores(by_l1, c), stable=True).indices
    apply_plan(by_l1, {c.name: order[:c.units - keep].tolist()})
    rotate_couple(model, c)
    apply_plan(model, {c.name: list(range(keep, c.units))})
    truncated, l1 = (a1.T @ a0 for a0, a1 in (side_matrices(m, couple(m, c.name)) for m in (model, by_l1)))
    assert couple(model, c.name).units == couple(by_l1, c.name).units == keep
    attn = build("llama").model.layers[0].self_attn  # Eckart-Young by the plain factorisation of the product
    right, left = tsvd(attn.v_proj.weight[:16].double(), torch.cat([attn.o_proj.weight[:, h * 16:(h + 1) * 16]
                                                                     for h in (0, 1)]).double(), keep)
    torch.testing.assert_close(truncated, left @ right)
    sigma = torch.linalg.svdvals(product)
    best = float(sigma[keep:].pow(2).sum().sqrt())  # Eckart-Young: the error of the best rank-6 product
    assert abs(float((truncated - product).norm()) - best) < 1e-5 * best
    assert float((l1 - product).norm()) > 1.2 * best


def test_rotary_query_key_pairs_are_ordered_by_their_norms_and_never_rotated():
    model = build("llama")
    c = couple(model, "model.layers.0:qk.1")
    assert pinned(model, c) and c.units == 8  # head_dim 16: 8 rotary pairs
    attn = model.model.layers[0].self_attn
    q, k = attn.q_proj.weight.double(), attn.k_proj.weight.double()
    pairs = [torch.tensor([j, j + 8]) for j in range(8)]
    q_norm = torch.stack([sum(q[h * 16 + p].pow(2).sum() for h in (2, 3)).sqrt() for p in pairs])  # heads 2, 3
    k_norm = torch.stack([k[16 + p].norm() for p in pairs])
    torch.testing.assert_close(strength(model, c), q_norm * k_norm)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert rotate_couple(model, c) is False
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_ffn_rotation_keeps_the_product_not_the_function():
    """The ablation's point: the product down·[gate | up] is unchanged, the gated FFN is not."""
    model = build("llama")
    mlp = model.model.layers[0].mlp
    product = mlp.down_proj.weight.double() @ torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], 1).double()
    x = tokens()
    before = outputs(model, x)
    rotate_couple(model, couple(model, "model.layers.0:ffn"))
    after = mlp.down_proj.weight.double() @ torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], 1).double()
    torch.testing.assert_close(after, product)
    assert (outputs(model, x) - before).abs().max() > 1e-3


@pytest.mark.parametrize("name, couple_name", [("llama-bias", "model.layers.0:vo.1"),
                                               ("gpt2", "transformer.h.0:vo.2")])  # GPT-2: square Conv1D c_proj
def test_rotation_resets_the_rotated_slices_moments_only(name, couple_name):
    model = build(name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = tokens()
    for _ in range(2):
        model.zero_grad()
        model(x, labels=x).loss.backward()
        optimizer.step()
    c = couple(model, couple_name)
    old = {id(p): {k: t.clone() for k, t in optimizer.state[p].items()} for p in model.parameters()}
    rotate_couple(model, c, optimizer)
    touched = set()
    for m in c.members:
        module = model.get_submodule(m.layer)
        conv = isinstance(module, Conv1D)
        params = [(module.weight, m.dim, conv)] + ([(module.bias, 0, False)] if m.dim == 0 and module.bias is not None else [])
        for p, dim, transposed in params:
            touched.add(id(p))
            state, before = optimizer.state[p], old[id(p)]
            assert torch.equal(state["step"], before["step"])
            for key in ("exp_avg", "exp_avg_sq"):
                new, was = (state[key].T, before[key].T) if transposed else (state[key], before[key])
                new, was = (new, was) if dim == 0 else (new.T, was.T)  # the member's slices as rows
                mask = torch.zeros(new.shape[0], dtype=torch.bool)
                mask[m.index.flatten()] = True
                assert torch.equal(new[~mask], was[~mask])  # the other groups' slices untouched
                for slot in m.index.T:  # one slot: the rows of one query head (o), of the value dims (v)...
                    if key == "exp_avg":
                        assert torch.all(new[slot] == 0)
                    else:
                        torch.testing.assert_close(new[slot], torch.full_like(new[slot], float(was[slot].mean())))
    for p in model.parameters():
        if id(p) not in touched:
            assert all(torch.equal(v, old[id(p)][k]) for k, v in optimizer.state[p].items())


def test_unit_score_flags_are_refused_for_tsvd():
    with pytest.raises(ConfigError, match="tsvd ranks singular directions of each coupled product"):
        build_train_method("tsvd", 10, {"round_steps": 2, "unit_score": "l1"})
    assert "tsvd" in method_names("train-time")
