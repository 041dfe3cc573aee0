"""SparseLLM: every closed-form update is the exact minimiser of its sub-problem, the FFN
objective never increases, and the result is never worse than SparseGPT."""

import pytest
import torch
import torch.nn.functional as F

from sparseforge import prune
from sparseforge.oneshot import activation_solve
from sparseforge.oneshot.sparsellm import (
    FFNProblem,
    gated_aux_step,
    gated_z_update,
    least_squares_target,
    relu_z_update,
    ridge_activation_update,
    scalar_activation_solve,
    sparsellm_ffn,
)
from sparseforge.sparsity import Pattern, prune_count, satisfies
from tiny import TINY_MODELS, VOCAB

G = torch.Generator().manual_seed(0)


def rand(*shape, scale=1.0):
    return torch.randn(*shape, generator=G, dtype=torch.float64) * scale


def grid_min(cost, lo, hi, points=200001):
    """Brute force: the lowest cost on a dense grid between lo and hi, per element."""
    t = torch.linspace(0, 1, points, dtype=torch.float64)[:, None]
    best = torch.full_like(lo, float("inf"))
    for part in t.split(10000):  # bounded memory
        best = torch.minimum(best, cost(lo[None] + (hi - lo)[None] * part).min(dim=0).values)
    return best


def test_relu_update_is_exact_minimiser():
    a, m = rand(200), rand(200)
    alpha, beta = 0.7, 1.3
    z = relu_z_update(a, m, alpha, beta)

    def cost(t):
        return beta * (a - torch.relu(t)).square() + alpha * (t - m).square()

    best = grid_min(cost, torch.full_like(a, -6), torch.full_like(a, 6))
    assert (cost(z) <= best + 1e-9).all()


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_scalar_solve_no_grid_point_is_lower(activation):
    a, c, m = rand(2000, scale=2), rand(2000, scale=2), rand(2000, scale=2)
    if activation == "gelu":
        c = torch.ones_like(a)
    alpha, beta = 1.0, 5.0
    phi = F.silu if activation == "silu" else F.gelu
    t = scalar_activation_solve(activation, a, c, m, alpha, beta, start=m.clone())

    def cost(x):
        return beta * (a - c * phi(x)).square() + alpha * (x - m).square()

    best = grid_min(cost, m - 12, m + 12)
    assert (cost(t) <= best + 1e-7 * (1 + best)).all(), float((cost(t) - best).max())


def _compile_small_chunks(monkeypatch):
    """The compiled stages on this test's small problems: chunks of 1024 elements (the last
    one padded), compiled whatever the size."""
    monkeypatch.setattr(activation_solve, "CHUNK", 1024)
    monkeypatch.setattr(activation_solve, "COMPILE_MIN_ELEMENTS", 0)


def test_compiled_solve_equals_eager(monkeypatch):
    a, z, m = (torch.randn(3500, generator=G) for _ in range(3))
    eager = scalar_activation_solve("silu", a, z, m, 5.0, 5.0, start=m)
    _compile_small_chunks(monkeypatch)
    monkeypatch.setenv("SPARSEFORGE_COMPILE", "1")
    compiled = scalar_activation_solve("silu", a, z, m, 5.0, 5.0, start=m)
    assert activation_solve._COMPILED and all(v is not k for k, v in activation_solve._COMPILED.items())
    assert torch.allclose(compiled, eager, atol=1e-5)


def test_scalar_solve_never_worse_than_its_start():
    a, z, m = rand(500), rand(500), rand(500)
    start = rand(500)
    t = scalar_activation_solve("silu", a, z, m, 0.5, 2.0, start=start, iterations=2, grid=1)

    def cost(x):
        return 2.0 * (a - z * F.silu(x)).square() + 0.5 * (x - m).square()

    assert (cost(t) <= cost(start) + 1e-12).all()


def _zero_gradient(objective, variable):
    variable = variable.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(variable), variable)
    return grad.abs().max().item()


def test_ridge_a_update_zero_gradient():
    y, w, h = rand(64, 6), rand(6, 10), rand(64, 10)
    alpha, beta = 0.3, 2.0
    a, a_down = ridge_activation_update(y.float(), w.float(), h.float(), alpha, beta)
    g = _zero_gradient(lambda v: alpha * (y - v @ w.T).square().sum() + beta * (v - h).square().sum(), a.double())
    assert g < 1e-3
    # the normal equations' direct form, and a Wdᵀ from the shortcut
    direct = torch.linalg.solve(alpha * w.T @ w + beta * torch.eye(10, dtype=w.dtype), (alpha * y @ w + beta * h).T).T
    assert torch.allclose(a.double(), direct, atol=1e-5)
    assert torch.allclose(a_down.double(), direct @ w.T, atol=1e-5)


def test_gated_step_is_z_then_s_updates(monkeypatch):
    """The fused step equals the closed-form z update for the current s, then the 1-D s solve
    for that z, then SiLU(s)⊙z, compiled or not."""
    a, mu, mg, s = (torch.randn(3000, generator=G) for _ in range(4))
    sig = F.silu(s)
    z = gated_z_update(mu, sig, a, 5.0, 3.0)
    s_new = scalar_activation_solve("silu", a, z, mg, 5.0, 3.0, start=s)
    _compile_small_chunks(monkeypatch)
    for flag in ("0", "1"):
        monkeypatch.setenv("SPARSEFORGE_COMPILE", flag)
        z2, s2, h2 = gated_aux_step(a, mu, mg, s, 5.0, 3.0)
        assert torch.allclose(z2, z, atol=1e-5)
        # near-ties between two basins may resolve differently in fused arithmetic: compare costs
        cost = (3.0 * (a - z * F.silu(s2)).square() + 5.0 * (s2 - mg).square(),
                3.0 * (a - z * F.silu(s_new)).square() + 5.0 * (s_new - mg).square())
        assert torch.allclose(cost[0], cost[1], rtol=1e-5, atol=1e-6)
        assert torch.allclose(h2, F.silu(s2) * z2, atol=1e-5)


def test_gated_z_update_zero_gradient():
    m, sig, a = rand(50, 8), rand(50, 8), rand(50, 8)
    z = gated_z_update(m, sig, a, 5.0, 3.0)
    assert _zero_gradient(lambda v: 3.0 * (a - sig * v).square().sum() + 5.0 * (v - m).square().sum(), z) < 1e-9


def test_least_squares_target_zero_gradient():
    x, t = rand(400, 12), rand(400, 7)
    w = least_squares_target(t.T @ x, x.T @ x, 0.0).double()
    assert _zero_gradient(lambda v: (t - x @ v.T).square().sum(), w) < 1e-2


def _problem(activation, d=32, f=64, n=1024):
    x = (rand(n, d) @ rand(d, d) * 0.3).float()
    weights = {"up": rand(f, d).float() * 0.2, "down": rand(d, f).float() * 0.2}
    biases = {}
    if activation == "silu_gated":
        weights["gate"] = rand(f, d).float() * 0.2
    else:
        biases = {"up": rand(f).float() * 0.1, "down": rand(d).float() * 0.1}
    return FFNProblem(activation, x, weights, biases)


@pytest.mark.parametrize("activation", ["relu", "silu_gated", "gelu"])
@pytest.mark.parametrize("pattern", ["0.7", "1:4", "2:4"])
def test_objective_monotone_error_below_sparsegpt_pattern_exact(activation, pattern):
    problem = _problem(activation)
    p = Pattern.parse(pattern)
    names = ["gate", "up", "down"] if activation == "silu_gated" else ["up", "down"]
    result = sparsellm_ffn(problem, {n: p for n in names}, alpha=1.0, beta=1.0, iterations=4, block_size=32)
    assert all(b <= a * (1 + 1e-6) for a, b in zip(result.objective, result.objective[1:])), result.objective
    assert result.objective[-1] < result.objective[0]
    assert result.output_error[result.best_iteration] <= result.output_error[0]
    y = problem.output(problem.weights)
    err = float((problem.output(result.weights) - y).square().sum() / y.square().sum())
    assert err == pytest.approx(result.output_error[result.best_iteration], rel=1e-4)
    for n in names:
        w = result.weights[n]
        assert satisfies(w, p)
        if not p.is_nm:
            assert int((w == 0).sum()) == prune_count(w.numel(), p.sparsity)


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_on_tiny_models_beats_sparsegpt_at_high_sparsity(family):
    ids = torch.randint(0, VOCAB, (8, 64), generator=torch.Generator().manual_seed(3))
    outputs = {}
    for method in ("sparsegpt", "sparsellm"):
        torch.manual_seed(0)
        model = TINY_MODELS[family]()
        report = prune(model, method=method, sparsity=0.7, calibration=ids, progress=False)
        assert report.sparsity == pytest.approx(0.7, abs=1e-4)
        outputs[method] = report
    details = outputs["sparsellm"].details
    assert len(details) == 2
    for log in details.values():
        assert all(b <= a * (1 + 1e-6) for a, b in zip(log["objective"], log["objective"][1:]))
        assert log["output_error"][log["best_iteration"]] < log["output_error"][0]


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_zero_iterations_is_sparsegpt(family):
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(4))
    states = []
    for method, extra in (("sparsegpt", {}), ("sparsellm", {"iterations": 0})):
        torch.manual_seed(0)
        model = TINY_MODELS[family]()
        prune(model, method=method, pattern="2:4", calibration=ids, progress=False, **extra)
        states.append(model.state_dict())
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_token_split_is_seeded_sorted_disjoint_and_none_when_all():
    from sparseforge.oneshot.sparsellm import token_split

    fit, held = token_split(1000, 100, seed=3)
    again = token_split(1000, 100, seed=3)
    assert torch.equal(fit, again[0]) and torch.equal(held, again[1])
    assert len(fit) == 100 and len(held) == 100 and not set(fit.tolist()) & set(held.tolist())
    assert torch.equal(fit, fit.sort().values) and torch.equal(held, held.sort().values)
    assert not torch.equal(fit, token_split(1000, 100, seed=4)[0])
    assert len(token_split(1000, 700)[1]) == 300  # the rest, when fewer than the subset
    assert token_split(1000, 1000) is None and token_split(1000, 0) is None and token_split(1000, None) is None


@pytest.mark.parametrize("activation", ["relu", "silu_gated", "gelu"])
def test_iterations_on_a_token_subset(activation):
    """On a subset: iteration 0 is still SparseGPT on every token, the objective on the subset never
    rises, and the weights returned are never worse than SparseGPT's on the held-out tokens."""
    from sparseforge.oneshot.sparsellm import token_split

    problem = _problem(activation, n=2048)
    p = Pattern.parse("0.8")
    names = ["gate", "up", "down"] if activation == "silu_gated" else ["up", "down"]
    kwargs = dict(alpha=1.0, beta=1.0, block_size=32)
    sgpt = sparsellm_ffn(problem, {n: p for n in names}, iterations=0, **kwargs)
    result = sparsellm_ffn(problem, {n: p for n in names}, iterations=4, aux_tokens=512, **kwargs)
    assert result.aux_tokens == 512
    assert all(b <= a * (1 + 1e-6) for a, b in zip(result.objective, result.objective[1:])), result.objective
    held = token_split(2048, 512)[1]
    x, y = problem.inputs[held], problem.output(problem.weights)[held]

    def held_error(w):
        up = x @ w["up"].T + (problem.bias("up") if problem.bias("up") is not None else 0)
        hidden = F.silu(x @ w["gate"].T) * up if activation == "silu_gated" else problem.true_act(up)
        out = hidden @ w["down"].T + (problem.bias("down") if problem.bias("down") is not None else 0)
        return float((out - y).square().sum() / y.square().sum())

    sgpt_error, chosen_error = result.held_out_error
    assert sgpt_error == pytest.approx(held_error(sgpt.weights), rel=1e-4)
    assert chosen_error == pytest.approx(held_error(result.weights), rel=1e-4)
    assert chosen_error <= sgpt_error
    # a subset as large as the data is the plain algorithm
    whole = sparsellm_ffn(problem, {n: p for n in names}, iterations=2, aux_tokens=2048, **kwargs)
    plain = sparsellm_ffn(problem, {n: p for n in names}, iterations=2, aux_tokens=None, **kwargs)
    assert whole.held_out_error is None and whole.objective == plain.objective


def test_subset_guard_returns_sparsegpt_when_the_subset_misleads():
    """A subset far too small to fit f = 64 hidden units: it prefers a later iterate, which is
    worse on held-out tokens, so SparseGPT's weights come back."""
    problem = _problem("silu_gated", n=2048)
    p = Pattern.parse("0.5")
    pats = {n: p for n in ("gate", "up", "down")}
    sgpt = sparsellm_ffn(problem, pats, alpha=1.0, beta=1.0, iterations=0, block_size=32)
    result = sparsellm_ffn(problem, pats, alpha=1.0, beta=1.0, iterations=3, block_size=32, aux_tokens=16)
    assert min(result.output_error[1:]) < 0.9 * result.output_error[0]
    sgpt_error, chosen_error = result.held_out_error
    assert chosen_error == sgpt_error and result.best_iteration == 0
    assert all(torch.equal(result.weights[n], sgpt.weights[n]) for n in pats)


def test_iteration_zero_is_the_engines_stacked_sparsegpt():
    """SparseLLM's iteration 0 prunes gate and up in one stacked solve, as the engine does for
    SparseGPT: the same weights as sparsegpt_prune on the stacked pair."""
    from sparseforge.oneshot.sparsegpt import sparsegpt_prune

    problem = _problem("silu_gated")
    p = Pattern.parse("0.6")
    result = sparsellm_ffn(problem, {n: p for n in ("gate", "up", "down")}, alpha=1.0, beta=1.0, iterations=0,
                           block_size=32)
    x = problem.inputs
    stacked = sparsegpt_prune(torch.cat([problem.weights["gate"], problem.weights["up"]]), x.T @ x * (2.0 / len(x)), p,
                              block_size=32, row_splits=[64, 64])
    assert torch.equal(result.weights["gate"], stacked[:64]) and torch.equal(result.weights["up"], stacked[64:])


def test_gram_from_the_lower_triangle_equals_the_full_product(monkeypatch):
    import sparseforge.oneshot.stats as stats
    from sparseforge.oneshot.sparsellm import _gram

    monkeypatch.setattr(stats, "GRAM_BLOCK", 8)  # 20 columns: blocks of 8, 8 and 4
    x = torch.randn(50, 20, generator=torch.Generator().manual_seed(0))
    gram = _gram(x)
    torch.testing.assert_close(gram, x.T @ x, rtol=1e-5, atol=1e-5)
    assert torch.equal(gram, gram.T)


@pytest.mark.parametrize("activation", ["silu_gated", "gelu"])
def test_dense_pass_in_row_chunks_equals_the_whole(monkeypatch, activation):
    """Iteration 0's dense pass, run in chunks of rows: the down input's Gram on every token,
    the variables and Y on the kept rows, Y on the held-out rows, as computed on all at once."""
    from sparseforge.oneshot import sparsellm

    monkeypatch.setattr(sparsellm, "DENSE_CHUNK_ROWS", 48)  # 200 rows: 4 chunks and a partial one
    problem = _problem(activation, n=200)
    kept, held = sparsellm.token_split(200, 60, seed=1)
    dense = sparsellm._dense_pass(problem, problem.inputs.float(), kept, held)
    x = problem.inputs.float()
    names = ["gate", "up"] if activation == "silu_gated" else ["up"]
    var = {n: problem.linear(x, n) for n in names}
    h = F.silu(var["gate"]) * var["up"] if activation == "silu_gated" else problem.act(var["up"])
    y = problem.linear(h if activation == "silu_gated" else problem.true_act(var["up"]), "down")
    torch.testing.assert_close(dense.gram_h, h.T @ h, rtol=1e-5, atol=1e-4)
    for n in names:
        torch.testing.assert_close(dense.var[n], var[n][kept])
    torch.testing.assert_close(dense.h, h[kept])
    torch.testing.assert_close(dense.y, torch.cat([y[kept], y[held]]))


def test_pseudo_inverse_rows_gives_the_least_squares_target():
    from sparseforge.oneshot.sparsellm import pseudo_inverse_rows

    x, t = rand(400, 12).float(), rand(400, 7).float()
    gram = x.T @ x
    torch.testing.assert_close(t.T @ pseudo_inverse_rows(x, gram, 1e-6), least_squares_target(t.T @ x, gram, 1e-6),
                               rtol=1e-4, atol=1e-5)
