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
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import NumericalError
from ..sparsity.pattern import Pattern
from .activation_solve import (  # noqa: F401 (re-exported: the element-wise sub-problems)
    gated_aux_step,
    gated_z_update,
    map_chunks,
    relu_z_update,
    scalar_activation_solve,
)
from .sparsegpt import sparsegpt_prune
from .stats import add_lower_gram, symmetric_from_lower

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ linear-algebra sub-problems

def _gram(x: torch.Tensor) -> torch.Tensor:
    """XᵀX from its lower triangle (about half the multiply of ``x.T @ x``), mirrored."""
    lower = torch.zeros(x.shape[1], x.shape[1], dtype=x.dtype)
    add_lower_gram(lower, x)
    return symmetric_from_lower(lower)


def _damped_solve(rows: torch.Tensor, gram: torch.Tensor, damp: float) -> torch.Tensor:
    """rows·(gram + λI)⁻¹ with λ = damp·mean(diag gram), in float64 by Cholesky (half the work
    of LU; LU where rounding left the damped matrix not positive definite)."""
    g = gram.to(torch.float64)
    g = g + damp * g.diagonal().mean().clamp_min(1e-12) * torch.eye(g.shape[0], dtype=g.dtype)
    rhs = rows.to(torch.float64).T
    factor, info = torch.linalg.cholesky_ex(g)
    solution = torch.cholesky_solve(rhs, factor) if int(info) == 0 else torch.linalg.solve(g, rhs)
    return solution.T.to(torch.float32)


def least_squares_target(cross: torch.Tensor, gram: torch.Tensor, damp: float) -> torch.Tensor:
    """W* = argmin ‖T − U Wᵀ‖ from cross = Tᵀ U (out x in) and gram = Uᵀ U: W* = cross·gram⁻¹,
    a pseudo-inverse guarded by λ = damp·mean(diag gram)."""
    return _damped_solve(cross, gram, damp)


def pseudo_inverse_rows(u: torch.Tensor, gram: torch.Tensor, damp: float) -> torch.Tensor:
    """U (UᵀU + λI)⁻¹ (N x in), λ as in ``least_squares_target``: with it, the least-squares
    W* = argmin ‖T − U Wᵀ‖ of any target T on the same U is Tᵀ·(this), one product, where
    ``least_squares_target`` factors and solves again for each T."""
    return _damped_solve(u, gram, damp)


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
class _DensePass:
    gram_h: torch.Tensor  # the down layer's input Gram hᵀh on every token
    var: dict[str, torch.Tensor]  # s (gate) and z (up) on the kept tokens
    h: torch.Tensor  # the activation term's target on the kept tokens
    y: torch.Tensor  # Y on the kept tokens, then on the held-out ones


#: tokens per chunk of the dense pass (a fresh 16,384 x 1536 tensor faults in every page;
#: chunks of this size are reused from the heap)
DENSE_CHUNK_ROWS = 2048


def _dense_pass(problem: FFNProblem, x: torch.Tensor, kept: torch.Tensor | None,
                held: torch.Tensor | None) -> _DensePass:
    """The dense FFN over X in row chunks: hᵀh over every token; s, z, h and Y on the ``kept``
    rows (all when None) and Y on the ``held`` ones (sorted indices)."""
    gated = problem.activation == "silu_gated"
    names = ["gate", "up"] if gated else ["up"]
    f = problem.weights["up"].shape[0]
    gram_lower = torch.zeros(f, f)
    var_parts, h_parts, y_parts, held_parts = {n: [] for n in names}, [], [], []
    for r0 in range(0, x.shape[0], DENSE_CHUNK_ROWS):
        r1 = min(r0 + DENSE_CHUNK_ROWS, x.shape[0])
        var = {n: problem.linear(x[r0:r1], n) for n in names}
        h = F.silu(var["gate"]) * var["up"] if gated else problem.act(var["up"])
        add_lower_gram(gram_lower, h)
        y_input = h if gated else problem.true_act(var["up"])  # Y = down(y_input)
        rows = slice(None) if kept is None else _rows_within(kept, r0, r1)
        for n in names:
            var_parts[n].append(var[n][rows])
        h_parts.append(h[rows])
        y_parts.append(problem.linear(y_input[rows], "down"))
        if held is not None:
            held_parts.append(problem.linear(y_input[_rows_within(held, r0, r1)], "down"))
    return _DensePass(symmetric_from_lower(gram_lower), {n: torch.cat(v) for n, v in var_parts.items()},
                      torch.cat(h_parts), torch.cat(y_parts + held_parts))


def _rows_within(index: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """The entries of a sorted row index within [r0, r1), relative to r0."""
    lo, hi = torch.searchsorted(index, torch.tensor([r0, r1])).tolist()
    return index[lo:hi] - r0


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
        """Least-squares targets of gate/up for the current variables."""
        return {n: centered(var[n], n).T @ x_pinv for n in inner_names}

    def centered(t, name):
        b = problem.bias(name)
        return t - b if b is not None else t

    # Every term is a sum of squared residuals over the tokens: float32 within a row,
    # float64 across rows. (Expanding ‖t − UWᵀ‖² through float32 Gram matrices
    # cancels badly once the residual is small.)
    def sq(t) -> float:
        return float(torch.linalg.vector_norm(t, dim=-1).to(torch.float64).square().sum())

    if not torch.isfinite(x).all():
        raise NumericalError(f"non-finite FFN inputs in SparseLLM for {layer}: check the data or use float32")
    gram_x = _gram(x)
    split = token_split(n_tokens, aux_tokens, seed) if iterations > 0 else None
    subset, held_out = split if split is not None else (None, None)
    # dense auxiliary variables (s, z, h) and Y, the dense FFN's output, on the tokens the
    # iterations use; the down layer's input Gram on every token
    dense = _dense_pass(problem, x, subset, held_out)
    var, h, y = dense.var, dense.h, dense.y

    # iteration 0: SparseGPT on the dense weights with the dense input Hessians, on every token
    weights = {k: v.to(torch.float32) for k, v in problem.weights.items()}
    pruned = prune_inner({n: weights[n] for n in inner_names}, gram_x)
    pruned["down"] = prune(weights["down"], dense.gram_h, "down")
    sparsegpt_weights = {k: v.clone() for k, v in pruned.items()}
    del dense

    def error_on(x_, y_, w) -> float:
        up = problem.linear(x_, "up", w["up"])
        hidden = F.silu(problem.linear(x_, "gate", w["gate"])) * up if gated else problem.true_act(up)
        return sq(problem.linear(hidden, "down", w["down"]) - y_) / max(sq(y_), 1e-30)

    if split is not None:
        x_held, y_held = x[held_out], y[len(subset):]
        sparsegpt_error_held = error_on(x_held, y_held, pruned)
        x, y = x[subset], y[: len(subset)]
        n_tokens = x.shape[0]
        gram_x = _gram(x)
    # the inner layers' input is fixed: their least-squares targets are Tᵀ·X⁺ (X⁺ once)
    x_pinv = pseudo_inverse_rows(x, gram_x, 1e-6) if iterations > 0 else None
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
            var["up"], var["gate"], h = gated_aux_step(a, m["up"], m["gate"], var["gate"], alpha, beta)
        elif problem.activation == "relu":
            (var["up"],) = map_chunks(lambda a_, m_: (relu_z_update(a_, m_, alpha, beta),), [a, m["up"]], 1,
                                      pad=False)
            h = problem.act(var["up"])
        else:
            var["up"] = scalar_activation_solve("gelu", a, 1.0, m["up"], alpha, beta, var["up"])
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
