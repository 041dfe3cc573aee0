"""SparseLLM (paper 002, METHODS.md section 3): prune an FFN jointly through auxiliary variables.

Pure tensor functions. Layout is token-major, as activations are in PyTorch:
``X`` (N x d) is the FFN input, ``Y`` (N x d) the dense FFN's output on it, and
the auxiliary variables are (N x f): ``s`` gate output, ``z`` up output (pre-
activation for ReLU/GELU FFNs), ``a`` down input. The objective (gated form) is

    α‖Y − a Wdᵀ − bd‖² + β‖a − SiLU(s)⊙z‖² + α‖z − X Wuᵀ − bu‖² + α‖s − X Wgᵀ − bg‖²

Iteration 0 prunes the dense weights with SparseGPT; each further iteration
applies, in order, the ridge update of ``a``, the closed-form ``z`` update, the
element-wise ``s`` update and the weight step (targets from the auxiliary
variables, pruned by SparseGPT on their own input Hessian). Each variable
update is the exact minimiser of its sub-problem; a pruned weight is only
accepted when it lowers its own term (SparseGPT is a heuristic on that term),
so the objective never increases. The weights returned are those of the
iterate with the lowest FFN output error on the calibration tokens, so the
result is never worse than SparseGPT on the data it was calibrated on.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import NumericalError
from ..sparsity.pattern import Pattern
from .sparsegpt import sparsegpt_prune
from .stats import add_lower_gram, symmetric_from_lower

log = logging.getLogger(__name__)

#: elements per chunk of the element-wise solves (keeps temporaries small)
CHUNK = 1 << 20


# ------------------------------------------------------------------ element-wise sub-problems

def relu_z_update(a: torch.Tensor, m: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """argmin_z β(a − ReLU(z))² + α(z − m)², element-wise, in closed form (two branches)."""
    z_off = torch.clamp(m, max=0.0)  # ReLU(z) = 0 branch: best z <= 0 is min(m, 0)
    z_on = torch.clamp((beta * a + alpha * m) / (alpha + beta), min=0.0)  # z >= 0 branch

    def cost(z):
        return beta * (a - torch.relu(z)).square() + alpha * (z - m).square()

    return torch.where(cost(z_on) <= cost(z_off), z_on, z_off)


def _silu_derivatives(t):
    sig = torch.sigmoid(t)
    value = t * sig
    d1 = sig * (1 + t * (1 - sig))
    d2 = sig * (1 - sig) * (2 + t * (1 - 2 * sig))
    return value, d1, d2


_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _gelu_derivatives(t):
    cdf = 0.5 * (1 + torch.erf(t * _SQRT_HALF))
    pdf = torch.exp(-0.5 * t * t) * _INV_SQRT_2PI
    return t * cdf, cdf + t * pdf, pdf * (2 - t * t)


ACTIVATIONS_1D = {"silu": _silu_derivatives, "gelu": _gelu_derivatives}
#: where each activation has its minimum (it is monotone on either side)
_TURNING_POINT = {"silu": -1.2784645, "gelu": -0.7517916}
_KNOTS = (-6.0, -4.0, -3.0, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 4.0)


def scalar_activation_solve(
    activation: str,
    a: torch.Tensor,
    c: torch.Tensor | float,
    m: torch.Tensor,
    alpha: float,
    beta: float,
    start: torch.Tensor | None = None,
    iterations: int = 4,
    grid: int = 3,
) -> torch.Tensor:
    """argmin_t β(a − c·φ(t))² + α(t − m)² per element, φ = SiLU or GELU (non-convex in t).

    Any minimiser lies within r = sqrt(β/α)·|a − c·φ(m)| of m (its cost is at most
    the cost at m). The solve samples m, ``start``, a grid over [m − r, m + r] and
    fixed knots where φ bends, then refines the best sample on each side of φ's
    minimum by ``iterations`` safeguarded Newton steps that stay on that side
    (trust radius a quarter of the side's range; each step tried at full, half and
    quarter length, kept only if the cost drops) and keeps the better side. The
    cost never rises above the best sample, so never above ``start``.

    Accuracy (tests and a wider check): no point of a 200,001-point grid is lower,
    to 1e-7 relative, on 20,000 random problems with β/α ≤ 5 (SiLU with random c,
    GELU with c = 1). A side can hold two basins; at β/α = 20 about 1 GELU
    problem in 4,000 ends in the shallower one (cost 0.06% above the minimum).

    The arithmetic is branch-free so that ``torch.compile`` fuses it into one loop
    over the elements (tens of times faster on CPU than one pass per operation);
    set SPARSEFORGE_COMPILE=0 to run it eagerly.
    """
    c = torch.as_tensor(c, dtype=a.dtype).expand_as(a)
    start = m if start is None else start
    return _solver()(a, c, m, start, float(alpha), float(beta), activation, iterations, grid)


def _scalar_solve_core(a, c, m, start, alpha: float, beta: float, activation: str, iterations: int, grid: int):
    derivatives = ACTIVATIONS_1D[activation]

    def cost(t):
        return beta * (a - c * derivatives(t)[0]).square() + alpha * (t - m).square()

    radius = math.sqrt(beta / alpha) * (a - c * derivatives(m)[0]).abs()
    lo, hi = m - radius, m + radius
    candidates = [m, start]
    if grid > 1:
        candidates += [m + radius * (2 * k / (grid - 1) - 1) for k in range(grid)]
        # the activation bends only near the origin: fixed points there catch basins
        # that a grid over a wide bracket steps over
        candidates += [torch.clamp(torch.full_like(m, p), lo, hi) for p in _KNOTS]
    turn = _TURNING_POINT[activation]
    inf = torch.full_like(m, float("inf"))
    best = {True: (m, inf), False: (m, inf)}  # per side of the turning point: (t, cost)
    for t in candidates:
        f = cost(t)
        right = t >= turn
        for side, on_side in ((True, right), (False, ~right)):
            best_t, best_f = best[side]
            better = on_side & (f < best_f)
            best[side] = (torch.where(better, t, best_t), torch.where(better, f, best_f))
    # Newton stays on its own side: a step across the turning point could fall into the
    # other side's basin, and that side's own best would be lost
    (t1, f1), (t2, f2) = (
        _newton_1d(derivatives, cost, a, c, m, alpha, beta, *best[True], torch.clamp(lo, min=turn), hi, iterations),
        _newton_1d(derivatives, cost, a, c, m, alpha, beta, *best[False], lo, torch.clamp(hi, max=turn), iterations),
    )
    return torch.where(f1 <= f2, t1, t2)


def _newton_1d(derivatives, cost, a, c, m, alpha, beta, t, f, lo, hi, iterations):
    """Safeguarded Newton on β(a − c·φ(t))² + α(t − m)² from (t, f = cost(t)); f never rises.
    Entries with f = inf (no start on this side) stay where they are."""
    finite = torch.isfinite(f)
    for _ in range(iterations):
        value, d1, d2 = derivatives(t)
        r = a - c * value
        grad = -2 * beta * c * d1 * r + 2 * alpha * (t - m)
        curv = 2 * beta * (c * d1).square() - 2 * beta * c * d2 * r + 2 * alpha
        # a trust region of a quarter of the range: where the curvature is small or not
        # positive (a concave stretch between basins) Newton overshoots or points nowhere
        # useful, and a step downhill by the trust radius is what makes progress
        radius = 0.25 * (hi - lo)
        newton = torch.where(curv > 0, grad / curv.clamp_min(1e-30), torch.sign(grad) * radius)
        step = torch.maximum(torch.minimum(newton, radius), -radius)
        step = torch.where(finite, step, torch.zeros_like(step))
        new_t, new_f = t, f
        for fraction in (1.0, 0.5, 0.25):
            trial = torch.clamp(t - fraction * step, lo, hi)
            f_trial = cost(trial)
            better = f_trial < new_f
            new_t, new_f = torch.where(better, trial, new_t), torch.where(better, f_trial, new_f)
        t, f = new_t, new_f
    return t, f


_COMPILED = {}


def _compiled(key, core):
    """``core`` compiled once per process, or eager where compiling is off or fails."""
    if os.environ.get("SPARSEFORGE_COMPILE", "1") == "0":
        return core
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(core, dynamic=True)
    fn = _COMPILED[key]

    def run(*args):
        try:
            return fn(*args)
        except Exception as e:  # a missing compiler must not stop a pruning run
            log.warning("torch.compile of the element-wise solve failed (%s); running it eagerly", e)
            _COMPILED[key] = core
            return core(*args)

    return run


def _solver():
    """The compiled element-wise solve, or the eager one where compiling is off or fails."""
    return _compiled("scalar", _scalar_solve_core)


def _gated_step_core(a, m_up, m_gate, s, alpha: float, beta: float, iterations: int, grid: int):
    """One pass of the gated FFN's element-wise updates: z for the current s (closed form),
    then s for that z (1-D solve from the current s), and the new down input SiLU(s)⊙z.
    One function so that ``torch.compile`` fuses all three into one loop over the elements."""
    sig = s * torch.sigmoid(s)
    z = (alpha * m_up + beta * sig * a) / (alpha + beta * sig * sig)
    s_new = _scalar_solve_core(a, z, m_gate, s, alpha, beta, "silu", iterations, grid)
    return z, s_new, s_new * torch.sigmoid(s_new) * z


def gated_aux_step(a, m_up, m_gate, s, alpha: float, beta: float, iterations: int = 4, grid: int = 3):
    """(z, s, SiLU(s)⊙z) after the z and s updates of one SparseLLM iteration (see above)."""
    return _compiled("gated", _gated_step_core)(a, m_up, m_gate, s, float(alpha), float(beta), iterations, grid)


def _chunked(fn, *tensors, **kwargs):
    """Apply an element-wise function (one or several outputs) over flat chunks of
    same-shaped tensors: the temporaries of a chunk stay small."""
    shape = tensors[0].shape
    n = tensors[0].numel()
    flats = [t.reshape(-1) if isinstance(t, torch.Tensor) and t.shape == shape else t for t in tensors]
    outs = None
    for i in range(0, n, CHUNK):
        parts = [t[i : i + CHUNK] if isinstance(t, torch.Tensor) and t.numel() == n else t for t in flats]
        result = fn(*parts, **kwargs)
        single = isinstance(result, torch.Tensor)
        result = (result,) if single else result
        if outs is None:
            outs = [torch.empty(n, dtype=r.dtype) for r in result]
        for out, r in zip(outs, result):
            out[i : i + CHUNK] = r
    outs = [o.reshape(shape) for o in outs]
    return outs[0] if single else tuple(outs)


# ------------------------------------------------------------------ linear-algebra sub-problems

def _gram(x: torch.Tensor) -> torch.Tensor:
    """XᵀX from its lower triangle (about half the multiply of ``x.T @ x``), mirrored."""
    lower = torch.zeros(x.shape[1], x.shape[1], dtype=x.dtype)
    add_lower_gram(lower, x)
    return symmetric_from_lower(lower)


def least_squares_target(cross: torch.Tensor, gram: torch.Tensor, damp: float) -> torch.Tensor:
    """W* = argmin ‖T − U Wᵀ‖ from cross = Tᵀ U (out x in) and gram = Uᵀ U: W* = cross·gram⁻¹,
    a pseudo-inverse guarded by λ = damp·mean(diag gram), solved in float64 by Cholesky (half
    the work of LU; LU where rounding left the damped matrix not positive definite)."""
    g = gram.to(torch.float64)
    g = g + damp * g.diagonal().mean().clamp_min(1e-12) * torch.eye(g.shape[0], dtype=g.dtype)
    rhs = cross.to(torch.float64).T
    factor, info = torch.linalg.cholesky_ex(g)
    solution = torch.cholesky_solve(rhs, factor) if int(info) == 0 else torch.linalg.solve(g, rhs)
    return solution.T.to(torch.float32)


def ridge_activation_update(y_centered: torch.Tensor, w_down: torch.Tensor, h: torch.Tensor,
                            alpha: float, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """a = argmin α‖y − a Wdᵀ‖² + β‖a − h‖², and a Wdᵀ.

    The normal equations give a = (α y Wd + β h)(α WdᵀWd + βI)⁻¹, an (N×f)(f×f) product. Written
    as a = h + (y − h Wdᵀ) B with B = α Wd (α WdᵀWd + βI)⁻¹ = α (α Wd Wdᵀ + βI)⁻¹ Wd (push-through
    identity), it needs a d×d solve and two N·d·f products; a Wdᵀ = h Wdᵀ + (y − h Wdᵀ)(B Wdᵀ)
    then costs N·d² instead of another N·d·f.
    """
    d = w_down.shape[0]
    w64 = w_down.to(torch.float64)
    system = alpha * (w64 @ w64.T) + beta * torch.eye(d, dtype=torch.float64)
    b = (alpha * torch.linalg.solve(system, w64)).to(torch.float32)  # d x f
    h_down = h @ w_down.T
    residual = y_centered - h_down
    a = torch.addmm(h, residual, b)
    a_down = torch.addmm(h_down, residual, b @ w_down.T)
    return a, a_down


def gated_z_update(m_up: torch.Tensor, sig: torch.Tensor, a: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """argmin_z β(a − σ⊙z)² + α(z − m_up)² = (α m_up + β σ a)/(α + β σ²)."""
    return (alpha * m_up + beta * sig * a) / (alpha + beta * sig.square())


# ------------------------------------------------------------------ the FFN solver

@dataclass
class FFNProblem:
    """An FFN and its calibration data. ``weights``/``biases`` keyed "gate", "up", "down"."""

    activation: str  # "relu", "gelu" or "silu_gated": the activation of the auxiliary objective
    inputs: torch.Tensor  # X, (N x d)
    weights: dict[str, torch.Tensor]
    biases: dict[str, torch.Tensor | None] = field(default_factory=dict)
    #: the model's own activation where it differs (GPT-2's tanh-approximate GELU); used for Y
    #: and the output error, while the objective uses the exact one its 1-D solve is built on
    model_activation: object = None

    def true_act(self, pre: torch.Tensor) -> torch.Tensor:
        return self.model_activation(pre) if self.model_activation is not None else self.act(pre)

    def bias(self, name):
        return self.biases.get(name)

    def linear(self, x, name, weight=None):
        out = x @ (self.weights[name] if weight is None else weight).T
        b = self.bias(name)
        return out + b if b is not None else out

    def act(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre) if self.activation == "relu" else F.gelu(pre)

    def hidden(self, weights) -> torch.Tensor:
        """The down projection's input for given weights."""
        x = self.inputs
        if self.activation == "silu_gated":
            return F.silu(self.linear(x, "gate", weights["gate"])) * self.linear(x, "up", weights["up"])
        return self.true_act(self.linear(x, "up", weights["up"]))

    def output(self, weights) -> torch.Tensor:
        return self.linear(self.hidden(weights), "down", weights["down"])


@dataclass
class SparseLLMResult:
    weights: dict[str, torch.Tensor]
    #: objective after each iteration (index 0: after the SparseGPT initialisation)
    objective: list[float]
    #: ‖Y − FFN(X)‖² / ‖Y‖² with the pruned weights after each iteration
    output_error: list[float]
    best_iteration: int
    #: tokens the iterations ran on (all of them unless ``aux_tokens`` took a subset)
    aux_tokens: int = 0
    #: on a token subset: the output error of SparseGPT's weights and of the weights returned
    #: (never higher) on held-out calibration tokens the iterations did not see; else None
    held_out_error: tuple[float, float] | None = None


#: calibration tokens SparseLLM's iterations run on by default (a seeded random subset; iteration 0
#: is SparseGPT on every token). Measured on SmolLM2 in docs/sparsellm.md: the same time buys
#: more iterations on fewer tokens, and more iterations lower the output error more than more
#: tokens do.
DEFAULT_AUX_TOKENS = 3072


def token_split(n_tokens: int, aux_tokens: int | None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A seeded random split of the tokens: ``aux_tokens`` to fit, and as many others (or all
    the rest, if fewer) held out; sorted indices. None when ``aux_tokens`` covers every token."""
    if not aux_tokens or aux_tokens >= n_tokens:
        return None
    order = torch.randperm(n_tokens, generator=torch.Generator().manual_seed(seed))
    return order[:aux_tokens].sort().values, order[aux_tokens : 2 * aux_tokens].sort().values


def sparsellm_ffn(
    problem: FFNProblem,
    patterns: dict[str, Pattern],
    *,
    alpha: float,
    beta: float,
    iterations: int = 4,
    dampening: float = 0.01,
    block_size: int = 128,
    layer: str = "ffn",
    aux_tokens: int | None = None,
    seed: int = 0,
) -> SparseLLMResult:
    """Prune the FFN's linear layers jointly; see the module docstring.

    Iteration 0 is SparseGPT on the dense weights. Each further iteration
    updates the auxiliary variables for the current pruned weights, then takes
    a weight step. (The weight step on the dense variables, where the reference
    code starts, only reproduces the dense weights' SparseGPT result.) The pruned
    layers' outputs on X are computed once per accepted weight and reused by
    the acceptance test, the objective and the output error.

    ``aux_tokens``: run iterations 1..K on a seeded random subset of that many
    tokens (their cost is linear in the tokens). Iteration 0 stays SparseGPT on
    every token, and the iterate chosen on the subset is returned only if its
    output error is below SparseGPT's on as many held-out calibration tokens
    (the subset's own error flatters the iterates fitted to it).
    """
    if alpha <= 0 or beta <= 0:
        raise ValueError("alpha and beta must be positive")
    gated = problem.activation == "silu_gated"
    x = problem.inputs.to(torch.float32)
    names = ["gate", "up", "down"] if gated else ["up", "down"]
    inner_names = names[:-1]
    n_tokens = x.shape[0]

    def check(value: float, what: str) -> float:
        # one finite sum per term instead of a scan of every N x f variable: a NaN anywhere
        # in a variable reaches the term it enters
        if not math.isfinite(value):
            raise NumericalError(f"non-finite {what} in SparseLLM for {layer}: check the data or use float32")
        return value

    def prune(w, gram, name):
        return sparsegpt_prune(w, gram * (2.0 / n_tokens), patterns[name], block_size=block_size,
                               dampening=dampening, layer=f"{layer}.{name}")

    stack_inner = gated and patterns["gate"] == patterns["up"]

    def prune_inner(targets: dict, gram) -> dict:
        """Gate and up share the input Hessian: one stacked solve, each keeping its own count
        (as the engine's SparseGPT does, so iteration 0 is its result exactly)."""
        if not stack_inner:
            return {n: prune(targets[n], gram, n) for n in inner_names}
        rows = [targets[n].shape[0] for n in inner_names]
        stacked = sparsegpt_prune(torch.cat([targets[n] for n in inner_names]), gram * (2.0 / n_tokens),
                                  patterns["up"], block_size=block_size, dampening=dampening, row_splits=rows,
                                  layer=f"{layer}.gate+up")
        return dict(zip(inner_names, torch.split(stacked, rows)))

    def inner_targets() -> dict:
        """Least-squares targets of gate/up for the current variables: one solve for both."""
        cross = torch.cat([centered(var[n], n).T @ x for n in inner_names])
        return dict(zip(inner_names, torch.split(least_squares_target(cross, gram_x, 1e-6),
                                                 [var[n].shape[1] for n in inner_names])))

    def centered(t, name):
        b = problem.bias(name)
        return t - b if b is not None else t

    def act_input(s_, z_):
        return F.silu(s_) * z_ if gated else problem.act(z_)

    # Every term is a sum of squared residuals over the tokens: float32 within a row,
    # float64 across rows. (Expanding ‖t − UWᵀ‖² through float32 Gram matrices
    # cancels badly once the residual is small.)
    def sq(t) -> float:
        return float(torch.linalg.vector_norm(t, dim=-1).to(torch.float64).square().sum())

    if not torch.isfinite(x).all():
        raise NumericalError(f"non-finite FFN inputs in SparseLLM for {layer}: check the data or use float32")
    gram_x = _gram(x)
    # dense auxiliary variables; Y is the dense FFN's output; h is the activation term's target
    var = {n: problem.linear(x, n) for n in inner_names}  # s (gate) and z (up)
    h = act_input(var.get("gate"), var["up"])
    y = problem.linear(h if gated else problem.true_act(var["up"]), "down")

    # iteration 0: SparseGPT on the dense weights with the dense input Hessians, on every token
    weights = {k: v.to(torch.float32) for k, v in problem.weights.items()}
    pruned = prune_inner({n: weights[n] for n in inner_names}, gram_x)
    pruned["down"] = prune(weights["down"], _gram(h), "down")
    sparsegpt_weights = {k: v.clone() for k, v in pruned.items()}

    def error_on(x_, y_, w) -> float:
        up = problem.linear(x_, "up", w["up"])
        hidden = F.silu(problem.linear(x_, "gate", w["gate"])) * up if gated else problem.true_act(up)
        return sq(problem.linear(hidden, "down", w["down"]) - y_) / max(sq(y_), 1e-30)

    split = token_split(n_tokens, aux_tokens, seed) if iterations > 0 else None
    if split is not None:
        subset, held_out = split
        x_held, y_held = x[held_out], y[held_out]
        sparsegpt_error_held = error_on(x_held, y_held, pruned)
        x, y, h = x[subset], y[subset], h[subset]
        var = {n: v[subset] for n, v in var.items()}
        n_tokens = x.shape[0]
        gram_x = _gram(x)
    y_c = centered(y, "down")
    y_norm = max(sq(y), 1e-30)
    a = h

    # m: outputs of the pruned gate/up on X; terms: each weight's current term of the objective
    m = {n: problem.linear(x, n, pruned[n]) for n in inner_names}
    terms = {n: sq(var[n] - m[n]) for n in inner_names}
    terms["down"] = sq(y_c - a @ pruned["down"].T)

    def output_error():
        hidden = F.silu(m["gate"]) * m["up"] if gated else problem.true_act(m["up"])
        return check(sq(problem.linear(hidden, "down", pruned["down"]) - y) / y_norm, "output error")

    def objective():
        return check(alpha * sum(terms.values()) + beta * sq(a - h), "objective")

    history = [objective()]
    errors = [output_error()]
    best = (errors[0], 0, {k: v.clone() for k, v in pruned.items()})

    for it in range(1, iterations + 1):
        # 1. a: ridge regression between the down projection and the activation
        a, a_down = ridge_activation_update(y_c, pruned["down"], h, alpha, beta)
        # 2./3. pre-activations: closed form for z, element-wise 1-D solves where non-convex
        if gated:
            var["up"], var["gate"], h = _chunked(
                lambda a_, mu_, mg_, s_: gated_aux_step(a_, mu_, mg_, s_, alpha, beta),
                a, m["up"], m["gate"], var["gate"])
        elif problem.activation == "relu":
            var["up"] = _chunked(lambda a_, m_: relu_z_update(a_, m_, alpha, beta), a, m["up"])
            h = problem.act(var["up"])
        else:
            var["up"] = _chunked(
                lambda a_, m_, z_: scalar_activation_solve("gelu", a_, 1.0, m_, alpha, beta, z_),
                a, m["up"], var["up"])
            h = problem.act(var["up"])

        # 4. weights: least-squares targets pruned by SparseGPT, kept only where their term drops
        changed = False
        candidates = prune_inner(inner_targets(), gram_x)
        for n in inner_names:
            candidate = candidates[n]
            m_candidate = problem.linear(x, n, candidate)
            term, term_candidate = sq(var[n] - m[n]), sq(var[n] - m_candidate)
            if term_candidate < term:
                pruned[n], m[n], terms[n], changed = candidate, m_candidate, term_candidate, True
            else:
                terms[n] = term
            del m_candidate
        g_a = _gram(a)
        candidate = prune(least_squares_target(y_c.T @ a, g_a, 1e-6), g_a, "down")
        del g_a
        term, term_candidate = sq(y_c - a_down), sq(y_c - a @ candidate.T)
        del a_down
        if term_candidate < term:
            pruned["down"], terms["down"], changed = candidate, term_candidate, True
        else:
            terms["down"] = term

        history.append(objective())
        errors.append(output_error() if changed else errors[-1])
        log.debug("%s: iteration %d objective %.5g output error %.5g", layer, it, history[-1], errors[-1])
        if errors[-1] < best[0]:
            best = (errors[-1], it, {k: v.clone() for k, v in pruned.items()})
    _, best_iteration, best_weights = best
    held_errors = None
    if split is not None:
        # the subset chose the iterate; tokens it did not see decide whether it beats SparseGPT
        chosen_error = error_on(x_held, y_held, best_weights) if best_iteration > 0 else sparsegpt_error_held
        if chosen_error >= sparsegpt_error_held:
            best_iteration, best_weights, chosen_error = 0, sparsegpt_weights, sparsegpt_error_held
        held_errors = (sparsegpt_error_held, chosen_error)
    return SparseLLMResult(best_weights, history, errors, best_iteration, n_tokens, held_errors)
