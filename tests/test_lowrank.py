"""LoSparse: the SVD split, the training and compact layers, row sensitivities and the global row threshold."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from sparseforge.errors import ConfigError
from sparseforge.lowrank import (
    CompactLoSparseLinear,
    LoSparseLinear,
    RowSensitivity,
    global_row_mask,
    lowrank_parameters,
    rank_for_ratio,
    sensitivity,
    svd_split,
)
from sparseforge.models.base import get_weight


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def linear(out_features=6, in_features=5, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


def close(a, b, rtol=1e-5):
    """Relative closeness in the Frobenius norm."""
    return float((a - b).norm()) <= rtol * max(float(b.norm()), 1e-12)


# ---------------------------------------------------------------- decompose


@pytest.mark.parametrize(
    "out_features, in_features, ratio, rank",
    [
        (4, 4, 0.5, 1),  # 0.5 * 16 / 8 = 1 exactly
        (12, 60, 0.1, 1),  # 1.0000000000000002 in floats: must not round up
        (28, 70, 0.1, 2),  # 2.0000000000000004 in floats
        (10, 30, 0.05, 1),  # 0.375 -> 1
        (10, 30, 0.0, 0),
        (3, 5, 1.0, 2),  # 1.875 -> 2
        (576, 1536, 0.05, 21),  # SmolLM2 q_proj: 0.05 * 576 * 1536 / 2112 = 20.94...
    ],
)
def test_rank_for_ratio(out_features, in_features, ratio, rank):
    assert rank_for_ratio(out_features, in_features, ratio) == rank
    assert lowrank_parameters(out_features, in_features, rank) <= ratio * out_features * in_features + out_features + in_features


@pytest.mark.parametrize("ratio", [-0.1, 1.5, 5, float("nan")])
def test_rank_for_ratio_rejects_ratios_outside_0_1(ratio):
    with pytest.raises(ConfigError, match=r"must be in \[0, 1\]: it is a fraction"):
        rank_for_ratio(8, 8, ratio)


def test_lowrank_parameters():
    assert lowrank_parameters(4, 6, 2) == 20
    assert lowrank_parameters(4, 6, 0) == 0


def test_svd_split_known_answer():
    W = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    U, V, S = svd_split(W, 1)
    assert U.shape == (2, 1) and V.shape == (1, 3)
    torch.testing.assert_close(U @ V, torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(S, torch.tensor([[0.0, 0.0, 0.0], [0.0, 2.0, 0.0]]))
    # Σ^½ on both sides: both factors have norm sqrt(σ1)
    assert U.norm().item() == pytest.approx(math.sqrt(3)) and V.norm().item() == pytest.approx(math.sqrt(3))


def test_svd_split_is_the_best_rank_r_approximation():
    W = torch.randn(7, 5, generator=gen(1))
    sigma = torch.linalg.svdvals(W.double())
    U, V, S = svd_split(W, 2)
    assert U.dtype == V.dtype == S.dtype == torch.float32
    assert close(U @ V + S, W, 1e-6)
    # Eckart–Young: the residual holds exactly the tail singular values
    assert S.double().norm().item() ** 2 == pytest.approx(float((sigma[2:] ** 2).sum()), rel=1e-5)
    # balanced factors: UᵀU = V Vᵀ = diag(σ1, σ2)
    torch.testing.assert_close(U.T @ U, torch.diag(sigma[:2]).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(V @ V.T, torch.diag(sigma[:2]).float(), atol=1e-5, rtol=1e-5)


def test_svd_split_full_rank_and_rank_zero():
    W = torch.randn(4, 6, generator=gen(2))
    U, V, S = svd_split(W, 4)
    assert S.abs().max() < 1e-5
    U, V, S = svd_split(W, 0)
    assert U.shape == (4, 0) and V.shape == (0, 6)
    assert torch.equal(S, W)
    S.zero_()
    assert W.abs().sum() > 0  # S is a copy


def test_svd_split_keeps_float64():
    W = torch.randn(5, 3, generator=gen(3), dtype=torch.float64)
    U, V, S = svd_split(W, 1)
    assert S.dtype == torch.float64 and close(U @ V + S, W, 1e-12)


def test_svd_split_validation():
    with pytest.raises(ConfigError, match=r"rank 4 must be in \[0, 3\] for a 3 x 5 matrix: lower the low-rank ratio"):
        svd_split(torch.zeros(3, 5), 4)
    with pytest.raises(ConfigError, match="2-D"):
        svd_split(torch.zeros(3), 1)


# ---------------------------------------------------------------- training layer


@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_keeps_the_output(bias):
    base = linear(bias=bias)
    layer = LoSparseLinear.from_linear(base, rank=2)
    assert (layer.out_features, layer.in_features, layer.rank) == (6, 5, 2)
    assert layer.lowrank_u.shape == (6, 2) and layer.lowrank_v.shape == (2, 5) and layer.sparse.shape == (6, 5)
    assert (layer.bias is None) == (not bias)
    assert layer.row_mask.dtype == torch.bool and bool(layer.row_mask.all())
    assert "row_mask" in layer.state_dict()
    x = torch.randn(3, 4, 5, generator=gen(4))
    with torch.no_grad():
        assert close(layer(x), base(x))
        assert close(layer.dense_weight(), base.weight)
    assert layer.parameter_count() == 2 * 11 + 6 * 5 + (6 if bias else 0)


def test_from_conv1d():
    torch.manual_seed(0)
    base = Conv1D(6, 5)  # nf = out = 6, nx = in = 5; weight stored 5 x 6
    nn.init.normal_(base.weight)
    nn.init.normal_(base.bias)
    layer = LoSparseLinear.from_linear(base, rank=3)
    assert (layer.out_features, layer.in_features) == (6, 5)
    x = torch.randn(2, 5, generator=gen(5))
    with torch.no_grad():
        assert close(layer(x), base(x))
        assert close(layer.dense_weight(), get_weight(base))


def test_masked_rows_get_no_gradient_and_stay_out_of_the_output():
    layer = LoSparseLinear.from_linear(linear(), rank=2)
    keep = torch.tensor([True, False, True, True, False, True])
    layer.apply_row_mask(keep)
    assert torch.equal(layer.row_mask, keep) and layer.kept_rows() == 4
    assert layer.sparse[~keep].abs().sum() == 0
    x = torch.randn(8, 5, generator=gen(6))
    layer(x).square().sum().backward()
    assert layer.sparse.grad[~keep].abs().sum() == 0
    assert (layer.sparse.grad[keep].abs().sum(1) > 0).all()
    # optimizer momentum may move a pruned row's stored values: the forward and dense weight ignore them
    with torch.no_grad():
        expected, dense = layer(x), layer.dense_weight()
        layer.sparse[1] = 5.0
        torch.testing.assert_close(layer(x), expected)
        torch.testing.assert_close(layer.dense_weight(), dense)
        torch.testing.assert_close(layer(x), x @ dense.T + layer.bias, rtol=1e-5, atol=1e-6)


def test_reference_mode_trains_pruned_rows_between_maskings():
    layer = LoSparseLinear.from_linear(linear(), rank=2, mask_in_forward=False)
    keep = torch.tensor([True, False, True, True, False, True])
    layer.apply_row_mask(keep)
    assert layer.sparse[~keep].abs().sum() == 0
    x = torch.randn(8, 5, generator=gen(7))
    layer(x).square().sum().backward()
    assert (layer.sparse.grad[~keep].abs().sum(1) > 0).all()  # the gradient reaches them
    with torch.no_grad():
        layer.sparse[1] = 1.0  # what an optimizer step would do
        dense = layer.lowrank_u @ layer.lowrank_v + layer.sparse  # S used as stored
        torch.testing.assert_close(layer.dense_weight(), dense)
        torch.testing.assert_close(layer(x), x @ dense.T + layer.bias)
        assert layer.kept_rows() == 4  # until the next masking zeroes it again


@pytest.mark.parametrize("mask_in_forward", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_compact_equals_the_masked_layer(mask_in_forward, bias):
    layer = LoSparseLinear.from_linear(linear(bias=bias), rank=2, mask_in_forward=mask_in_forward)
    keep = torch.tensor([False, True, True, False, False, True])
    layer.apply_row_mask(keep)
    compact = layer.compact()
    assert isinstance(compact, CompactLoSparseLinear)
    assert compact.rows == 3 and torch.equal(compact.row_index, torch.tensor([1, 2, 5]))
    assert compact.row_index.dtype == torch.int64 and "row_index" in compact.state_dict()
    assert compact.parameter_count() == layer.parameter_count() == sum(p.numel() for p in compact.parameters())
    assert compact.parameter_count() == 2 * 11 + 3 * 5 + (6 if bias else 0)
    x = torch.randn(2, 3, 5, generator=gen(8))
    with torch.no_grad():
        assert close(compact(x), layer(x))
        torch.testing.assert_close(compact.dense_weight(), layer.dense_weight())
    # the compact form owns its tensors
    with torch.no_grad():
        compact.sparse_rows.zero_()
    assert layer.sparse[keep].abs().sum() > 0


def test_compact_forward_is_differentiable():
    layer = LoSparseLinear.from_linear(linear(), rank=2)
    layer.apply_row_mask(torch.tensor([True, False, True, False, False, True]))
    compact = layer.compact()
    x = torch.randn(4, 5, generator=gen(9))
    compact(x).square().sum().backward()
    layer(x).square().sum().backward()
    torch.testing.assert_close(compact.sparse_rows.grad, layer.sparse.grad[[0, 2, 5]])
    torch.testing.assert_close(compact.lowrank_u.grad, layer.lowrank_u.grad)


def test_rank_zero_is_itp():
    base = linear()
    layer = LoSparseLinear.from_linear(base, rank=0)
    assert layer.rank == 0 and layer.lowrank_u.shape == (6, 0) and layer.lowrank_v.shape == (0, 5)
    assert torch.equal(layer.sparse, base.weight)
    x = torch.randn(4, 5, generator=gen(10))
    with torch.no_grad():
        assert close(layer(x), base(x))
    keep = torch.tensor([True, True, False, True, False, False])
    layer.apply_row_mask(keep)
    assert torch.equal(layer.dense_weight(), base.weight * keep[:, None])
    compact = layer.compact()
    assert torch.equal(compact.dense_weight(), base.weight * keep[:, None])
    assert compact.parameter_count() == 3 * 5 + 6
    with torch.no_grad():
        expected = x @ (base.weight * keep[:, None]).T + base.bias
        assert close(layer(x), expected) and close(compact(x), expected)


def test_all_rows_pruned_is_low_rank_only():
    layer = LoSparseLinear.from_linear(linear(), rank=2)
    layer.apply_row_mask(torch.zeros(6, dtype=torch.bool))
    lowrank = layer.lowrank_u.detach() @ layer.lowrank_v.detach()
    assert layer.kept_rows() == 0
    assert torch.equal(layer.dense_weight().detach(), lowrank)
    compact = layer.compact()
    assert compact.rows == 0 and torch.equal(compact.dense_weight().detach(), lowrank)
    assert compact.parameter_count() == layer.parameter_count() == 2 * 11 + 6
    x = torch.randn(4, 5, generator=gen(11))
    with torch.no_grad():
        expected = (x @ layer.lowrank_v.T) @ layer.lowrank_u.T + layer.bias
        assert close(compact(x), expected) and close(layer(x), expected)


def test_rank_zero_and_no_rows_without_bias_outputs_zeros():
    layer = LoSparseLinear.from_linear(linear(bias=False), rank=0)
    layer.apply_row_mask(torch.zeros(6, dtype=torch.bool))
    compact = layer.compact()
    x = torch.randn(2, 3, 5, generator=gen(12))
    assert torch.equal(compact(x), torch.zeros(2, 3, 6)) and compact.parameter_count() == 0


def test_compact_under_cpu_autocast():
    layer = LoSparseLinear.from_linear(linear(), rank=0)
    layer.apply_row_mask(torch.tensor([True, False, True, False, False, True]))
    compact = layer.compact()
    x = torch.randn(4, 5, generator=gen(13))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = compact(x)
    assert close(out.float(), compact(x).detach(), 2e-2)


def test_structure_round_trip_and_to_linear():
    layer = LoSparseLinear.from_linear(linear(), rank=2)
    layer.apply_row_mask(torch.tensor([True, False, True, False, False, True]))
    compact = layer.compact()
    structure = compact.structure()
    assert structure == {"class": "CompactLoSparseLinear", "in_features": 5, "out_features": 6, "rank": 2, "rows": 3, "bias": True}
    rebuilt = CompactLoSparseLinear.from_structure(structure)
    rebuilt.load_state_dict(compact.state_dict())
    x = torch.randn(4, 5, generator=gen(14))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), compact(x))
        plain = compact.to_linear()
        assert type(plain) is nn.Linear and close(plain(x), compact(x))
    assert CompactLoSparseLinear.from_structure(structure, dtype=torch.float64).lowrank_u.dtype == torch.float64
    with pytest.raises(ConfigError, match="is not a CompactLoSparseLinear"):
        CompactLoSparseLinear.from_structure(structure | {"class": "LoSparseLinear"})


def test_to_linear_without_bias():
    compact = LoSparseLinear.from_linear(linear(bias=False), rank=1).compact()
    plain = compact.to_linear()
    assert plain.bias is None
    x = torch.randn(4, 5, generator=gen(15))
    with torch.no_grad():
        assert close(plain(x), compact(x))


def test_layer_validation():
    with pytest.raises(ConfigError, match="do not fit a 6 x 5 layer"):
        LoSparseLinear(torch.zeros(6, 2), torch.zeros(3, 5), torch.zeros(6, 5))
    with pytest.raises(ConfigError, match="bias of shape"):
        LoSparseLinear(torch.zeros(6, 2), torch.zeros(2, 5), torch.zeros(6, 5), torch.zeros(5))
    layer = LoSparseLinear(torch.zeros(6, 2), torch.zeros(2, 5), torch.zeros(6, 5))
    with pytest.raises(ConfigError, match="one flag per output row"):
        layer.apply_row_mask(torch.ones(5, dtype=torch.bool))
    with pytest.raises(ConfigError, match="one index per kept row"):
        CompactLoSparseLinear(torch.zeros(6, 2), torch.zeros(2, 5), torch.zeros(3, 5), torch.zeros(2, dtype=torch.int64))


# ---------------------------------------------------------------- sensitivity


def test_sensitivity():
    p = nn.Parameter(torch.tensor([[1.0, -2.0]]))
    assert torch.equal(sensitivity(p), torch.zeros(1, 2))
    p.grad = torch.tensor([[3.0, 4.0]])
    assert torch.equal(sensitivity(p), torch.tensor([[3.0, 8.0]]))
    q = nn.Parameter(torch.tensor([[1.5]], dtype=torch.bfloat16))
    q.grad = torch.tensor([[-2.0]], dtype=torch.bfloat16)
    assert sensitivity(q).dtype == torch.float32 and sensitivity(q).item() == 3.0


I1 = torch.tensor([[2.0, 4.0, 0.0], [1.0, 1.0, 1.0]])
I2 = torch.tensor([[2.0, 0.0, 4.0], [1.0, 1.0, 1.0]])  # window 1 mean: [[2, 2, 2], [1, 1, 1]]
I3 = torch.tensor([[4.0, 0.0, 2.0], [3.0, 1.0, 2.0]])  # window 2, one step


def test_two_windows_by_hand():
    rs = RowSensitivity(beta1=0.75)
    rs.accumulate("s", I1)
    assert torch.equal(rs.row_scores("s"), torch.zeros(2))  # nothing folded in yet
    rs.accumulate("s", I2)
    rs.close_window()
    # Ī = 0.25 * window mean (Ī starts at 0): row means 0.5, 0.25
    torch.testing.assert_close(rs.row_scores("s"), torch.tensor([0.5, 0.25]))
    rs.accumulate("s", I3)
    rs.close_window()
    # Ī = 0.75 Ī + 0.25 I3 = [[1.375, 0.375, 0.875], [0.9375, 0.4375, 0.6875]]
    torch.testing.assert_close(rs.row_scores("s"), torch.tensor([0.875, 0.6875]))
    assert rs.row_scores("s").dtype == torch.float32


def test_two_windows_by_hand_with_uncertainty():
    rs = RowSensitivity(beta1=0.75, beta2=0.5)
    rs.accumulate("s", I1)
    rs.accumulate("s", I2)
    rs.close_window()
    # Ī = [[0.5]*3, [0.25]*3]; Ū = 0.5 |M − Ī| = [[0.75]*3, [0.375]*3]; Ī·Ū row means:
    torch.testing.assert_close(rs.row_scores("s"), torch.tensor([0.375, 0.09375]))
    rs.accumulate("s", I3)
    rs.close_window()
    # Ū = 0.5 Ū + 0.5 |I3 − Ī| = [[1.6875, 0.5625, 0.9375], [1.21875, 0.46875, 0.84375]]
    # Ī·Ū = [[2.3203125, 0.2109375, 0.8203125], [1.142578125, 0.205078125, 0.580078125]]
    torch.testing.assert_close(rs.row_scores("s"), torch.tensor([3.3515625 / 3, 1.927734375 / 3]))


def test_close_window_skips_names_without_steps():
    rs = RowSensitivity(beta1=0.75)
    rs.accumulate("a", I1)
    rs.accumulate("b", I1)
    rs.close_window()
    before = rs.row_scores("b")
    rs.accumulate("a", I3)
    rs.close_window()
    rs.close_window()  # an empty window changes nothing
    assert torch.equal(rs.row_scores("b"), before)
    torch.testing.assert_close(rs.row_scores("a"), 0.75 * 0.25 * I1.mean(1) + 0.25 * I3.mean(1))
    assert rs.names() == ["a", "b"]


def reference_row_scores(steps_per_window, beta1, beta2):
    """Per-entry PLATON EMAs in float64, reduced to row means at the end."""
    ipt = unc = 0.0
    for window in steps_per_window:
        mean = torch.stack(window).double().mean(0)
        ipt = beta1 * ipt + (1 - beta1) * mean
        unc = beta2 * unc + (1 - beta2) * (mean - ipt).abs()
    return (ipt * unc if beta2 < 1 else ipt).mean(1)


@pytest.mark.parametrize("beta2", [1.0, 0.9])
def test_row_sums_equal_the_per_entry_ema(beta2):
    g = gen(16)
    windows = [[torch.rand(9, 13, generator=g) for _ in range(n)] for n in (3, 1, 4, 2)]
    rs = RowSensitivity(beta1=0.85, beta2=beta2)
    for window in windows:
        for step in window:
            rs.accumulate("s", step)
        rs.close_window()
    torch.testing.assert_close(rs.row_scores("s").double(), reference_row_scores(windows, 0.85, beta2), rtol=1e-6, atol=0)
    state = rs.state_dict()["matrices"]["s"]
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
    # β2 = 1 keeps only per-row state
    assert all(t.shape == (9,) for t in tensors) if beta2 == 1 else any(t.shape == (9, 13) for t in tensors)


@pytest.mark.parametrize("beta2", [1.0, 0.7])
def test_state_dict_resumes_exactly(beta2):
    g = gen(17)
    steps = [torch.rand(4, 6, generator=g) for _ in range(7)]
    a = RowSensitivity(beta1=0.8, beta2=beta2)
    for s in steps[:3]:
        a.accumulate("s", s)
    a.close_window()
    a.accumulate("s", steps[3])  # an open window is saved too
    saved = a.state_dict()
    b = RowSensitivity(beta1=0.8, beta2=beta2)
    b.load_state_dict(saved)
    for rs in (a, b):
        for s in steps[4:]:
            rs.accumulate("s", s)
        rs.close_window()
    assert torch.equal(a.row_scores("s"), b.row_scores("s"))
    a.accumulate("s", steps[0])  # saved tensors are copies
    a.close_window()
    c = RowSensitivity(beta1=0.8, beta2=beta2)
    c.load_state_dict(saved)
    assert c.state_dict()["matrices"]["s"]["count"] == 1
    with pytest.raises(ConfigError, match="resume with the same betas"):
        RowSensitivity(beta1=0.5, beta2=beta2).load_state_dict(saved)


@pytest.mark.parametrize("beta1, beta2, message", [(1.0, 1.0, "beta1 1.0"), (-0.1, 1.0, "beta1 -0.1"), (0.85, 0.0, "beta2 0.0"),
                                                   (0.85, 1.5, "beta2 1.5")])
def test_row_sensitivity_validation(beta1, beta2, message):
    with pytest.raises(ConfigError, match=message):
        RowSensitivity(beta1, beta2)


def test_row_sensitivity_misuse():
    rs = RowSensitivity()
    rs.accumulate("s", torch.ones(2, 3))
    with pytest.raises(ConfigError, match="one name per matrix"):
        rs.accumulate("s", torch.ones(3, 3))
    with pytest.raises(KeyError, match="no sensitivity accumulated for 't'"):
        rs.row_scores("t")


# ---------------------------------------------------------------- global row mask


SCORES = {"a": torch.tensor([0.9, 0.1, 0.5]), "b": torch.tensor([0.8, 0.3])}
COSTS = {"a": 4, "b": 10}  # order a0 (4), b0 (10), a2 (4), b1 (10), a1 (4): cumulative 4, 14, 18, 28, 32


def masks(budget, scores=SCORES, costs=COSTS, alive=None):
    return {k: v.tolist() for k, v in global_row_mask(scores, costs, budget, alive).items()}


def test_global_row_mask_by_hand():
    assert masks(17) == {"a": [True, False, False], "b": [True, False]}  # 14 <= 17 < 18
    assert masks(18) == {"a": [True, False, True], "b": [True, False]}
    # prefix rule: b0 does not fit, so the cheaper, lower-scored a2 is not taken either
    assert masks(10) == {"a": [True, False, False], "b": [False, False]}
    assert masks(3) == {"a": [False, False, False], "b": [False, False]}
    assert masks(0) == {"a": [False, False, False], "b": [False, False]}
    assert masks(32) == masks(10**9) == {"a": [True, True, True], "b": [True, True]}


def test_global_row_mask_is_exact_and_a_threshold():
    g = gen(18)
    scores = {"q": torch.rand(7, generator=g), "up": torch.rand(11, generator=g), "down": torch.rand(5, generator=g)}
    costs = {"q": 7, "up": 5, "down": 11}
    total = 7 * 7 + 11 * 5 + 5 * 11
    for budget in range(0, total + 2, 3):
        keep = global_row_mask(scores, costs, budget)
        kept_cost = sum(int(keep[n].sum()) * costs[n] for n in scores)
        kept = [s for n in scores for s in scores[n][keep[n]].tolist()]
        dropped = [(s, costs[n]) for n in scores for s in scores[n][~keep[n]].tolist()]
        assert kept_cost <= budget
        if dropped:
            best, cost = max(dropped)
            assert budget < kept_cost + cost  # the next row would not fit
            assert all(s >= best for s in kept)


def test_global_row_mask_ties_follow_name_order_then_row_index():
    costs = {"a": 1, "b": 1}
    assert masks(2, {"b": torch.tensor([1.0]), "a": torch.tensor([1.0, 1.0])}, costs) == {"b": [True], "a": [True, False]}
    assert masks(2, {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([1.0])}, costs) == {"a": [True, True], "b": [False]}


def test_global_row_mask_never_keeps_dead_rows():
    alive = {"a": torch.tensor([False, True, True]), "b": torch.tensor([True, True])}
    # a0 is dead: b0 (10), a2 (4), b1 (10), a1 (4): cumulative 10, 14, 24, 28
    assert masks(14, alive=alive) == {"a": [False, False, True], "b": [True, False]}
    assert masks(10**9, alive=alive) == {"a": [False, True, True], "b": [True, True]}
    assert masks(10**9, alive={"b": torch.tensor([False, True])}) == {"a": [True, True, True], "b": [False, True]}


def test_global_row_mask_ranks_nan_last():
    scores = {"a": torch.tensor([float("nan"), 0.1, 0.2])}
    assert masks(2, scores, {"a": 1}) == {"a": [False, True, True]}


def test_global_row_mask_validation():
    with pytest.raises(ConfigError, match="must name the same matrices"):
        global_row_mask(SCORES, {"a": 4}, 10)
    with pytest.raises(ConfigError, match="budget -1 must be >= 0"):
        global_row_mask(SCORES, COSTS, -1)
    with pytest.raises(ConfigError, match="one flag per row"):
        global_row_mask(SCORES, COSTS, 10, {"a": torch.ones(2, dtype=torch.bool)})
    assert global_row_mask({}, {}, 10) == {}
