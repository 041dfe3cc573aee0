"""Known answers for the one-shot solvers: hand-computed cases, invariants, and
'strictly better than the simpler method on the same objective'."""

import pytest
import torch

from sparseforge.errors import NumericalError
from sparseforge.oneshot import magnitude_prune, sparsegpt_prune, wanda_prune
from sparseforge.oneshot.sparsegpt import inverse_hessian_factor
from sparseforge.oneshot.stats import InputStats
from sparseforge.oneshot.wanda import wanda_scores
from sparseforge.sparsity import Pattern, prune_count, satisfies, sparsity_of
from tiny import correlated_inputs


def recon_error(w, w_pruned, x):
    return float(((x @ w.T - x @ w_pruned.T) ** 2).sum())


def test_magnitude_exact_mask():
    w = torch.tensor([[0.5, -3.0, 0.1, 2.0], [-0.2, 1.0, -4.0, 0.3]])
    out = magnitude_prune(w, Pattern.parse("0.5"))
    assert out.tolist() == [[0.0, -3.0, 0.0, 2.0], [0.0, 1.0, -4.0, 0.0]]  # 4 smallest of 8 go
    out = magnitude_prune(w, Pattern.parse("2:4"))
    assert out.tolist() == [[0.0, -3.0, 0.0, 2.0], [0.0, 1.0, -4.0, 0.0]]  # 2 largest of each 4


def test_wanda_matches_hand_computed_score():
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5], [-1.0, 0.5, 0.25, 4.0]])
    x = torch.tensor([[3.0, 0.0, 1.0, 2.0], [4.0, 1.0, 0.0, 0.0]])  # column norms 5, 1, 1, 2
    stats = InputStats(4, "sq_norms")
    stats.add(x)
    assert stats.sq_norms.tolist() == [25.0, 1.0, 1.0, 4.0]
    expected = torch.tensor([[5.0, 2.0, 3.0, 1.0], [5.0, 0.5, 0.25, 8.0]])
    assert torch.allclose(wanda_scores(w, stats.sq_norms), expected)
    out = wanda_prune(w, stats.sq_norms, Pattern.parse("0.5"))
    # per row keep the 2 largest scores: row0 -> 5, 3 ; row1 -> 8, 5
    assert out.tolist() == [[1.0, 0.0, 3.0, 0.0], [-1.0, 0.0, 0.0, 4.0]]


def test_hessian_statistics_match_dense_product():
    x = torch.randn(3, 10, 6)
    stats = InputStats(6, "hessian")
    stats.add(x[:2])
    stats.add(x[2:])
    flat = x.reshape(-1, 6)
    assert torch.allclose(stats.hessian, 2 * flat.T @ flat / 30, atol=1e-5)
    assert torch.allclose(stats.sq_norms, (flat**2).sum(0), atol=1e-4)


@pytest.mark.parametrize("d", [6, 300])
def test_hessian_from_column_blocks_is_the_symmetric_product(d, monkeypatch):
    """Only the lower triangle is multiplied (in column blocks, here of 7 or the default); the Hessian
    mirrors it: equal to the full product, exactly symmetric, NaN anywhere still caught."""
    import sparseforge.oneshot.stats as stats_module

    for block in (7, stats_module.GRAM_BLOCK):
        monkeypatch.setattr(stats_module, "GRAM_BLOCK", block)
        x = torch.randn(2, 40, d, generator=torch.Generator().manual_seed(d))
        stats = InputStats(d, "hessian")
        stats.add(x[:1])
        stats.add(x[1:])
        flat = x.reshape(-1, d).double()
        expected = (2 * flat.T @ flat / 80).float()
        torch.testing.assert_close(stats.hessian, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(stats.hessian, stats.hessian.T)
        bad = torch.zeros(1, d)
        bad[0, d - 1] = float("nan")  # the last column: in the last block
        with pytest.raises(NumericalError):
            stats.add(bad)


def test_non_finite_activations_name_the_layer():
    stats = InputStats(4, "hessian", layer="model.layers.3.mlp.down_proj")
    with pytest.raises(NumericalError, match="model.layers.3.mlp.down_proj"):
        stats.add(torch.tensor([[1.0, float("nan"), 0.0, 1.0]]))


def _problem(out=48, d=64, n=512, seed=0):
    x = correlated_inputs(n, d, seed)
    w = torch.randn(out, d, generator=torch.Generator().manual_seed(seed + 1))
    stats = InputStats(d, "hessian")
    stats.add(x)
    return w, x, stats


def test_sparsegpt_zero_sparsity_is_identity():
    w, x, stats = _problem()
    assert torch.equal(sparsegpt_prune(w, stats.hessian, Pattern.parse("0")), w)


@pytest.mark.parametrize("pattern", ["0.5", "2:4", "0.7", "1:4"])
def test_sparsegpt_beats_wanda_and_magnitude(pattern):
    w, x, stats = _problem()
    p = Pattern.parse(pattern)
    sgpt = sparsegpt_prune(w, stats.hessian, p, block_size=16)
    wanda = wanda_prune(w, stats.sq_norms, p)
    mag = magnitude_prune(w, p)
    e_sgpt, e_wanda, e_mag = (recon_error(w, v, x) for v in (sgpt, wanda, mag))
    assert e_sgpt < e_wanda and e_sgpt < e_mag, (e_sgpt, e_wanda, e_mag)
    assert satisfies(sgpt, p)
    if not p.is_nm:
        assert int((sgpt == 0).sum()) == prune_count(w.numel(), p.sparsity)


def test_sparsegpt_exact_pattern_with_stacked_rows():
    w, x, stats = _problem(out=40)
    p = Pattern.parse("0.6")
    out = sparsegpt_prune(w, stats.hessian, p, row_splits=[30, 10], block_size=16)
    for part in torch.split(out, [30, 10]):
        assert int((part == 0).sum()) == prune_count(part.numel(), 0.6)
    # stacking changes nothing for N:M (rows are independent)
    q = Pattern.parse("2:4")
    stacked = sparsegpt_prune(w, stats.hessian, q, row_splits=[30, 10], block_size=16)
    separate = torch.cat([sparsegpt_prune(part, stats.hessian, q, block_size=16) for part in torch.split(w, [30, 10])])
    assert torch.allclose(stacked, separate, atol=1e-5)


def test_sparsegpt_dead_input_column():
    w, x, _ = _problem()
    x[:, 5] = 0.0
    stats = InputStats(x.shape[1], "hessian")
    stats.add(x)
    out = sparsegpt_prune(w, stats.hessian, Pattern.parse("0.5"), block_size=16)
    assert torch.isfinite(out).all()
    assert (out[:, 5] == 0).all()
    assert sparsity_of(out) == pytest.approx(0.5)


def test_sparsegpt_update_improves_on_its_own_mask():
    """The OBS update must beat simply zeroing the same weights."""
    w, x, stats = _problem()
    out = sparsegpt_prune(w, stats.hessian, Pattern.parse("0.5"), block_size=16)
    mask_only = w.masked_fill(out == 0, 0)
    assert recon_error(w, out, x) < 0.8 * recon_error(w, mask_only, x)


def test_cholesky_retry_then_clear_error():
    # indefinite at the first dampening level (-0.05 + 0.0065 < 0), definite at 10x
    h = torch.diag(torch.tensor([1.0, 1.0, -0.05]))
    u = inverse_hessian_factor(h, 0.01, "toy")
    damped = h + 0.1 * h.diagonal().mean() * torch.eye(3)
    assert torch.allclose(u.T @ u, torch.linalg.inv(damped), atol=1e-5)
    with pytest.raises(NumericalError, match="toy"):
        inverse_hessian_factor(-torch.eye(8), 0.01, "toy")
    with pytest.raises(NumericalError, match="non-finite Hessian for layer toy"):
        inverse_hessian_factor(torch.full((4, 4), float("inf")), 0.01, "toy")
