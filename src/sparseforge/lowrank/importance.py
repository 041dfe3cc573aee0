"""Row (output-neuron) importance for LoSparse / ITP and the global row threshold (METHODS.md sections 5, 5a).

Per entry ``I = |S ⊙ ∇S|``, accumulated every step; once per window of ΔT steps the
window's mean ``M`` updates ``Ī ← β1 Ī + (1 − β1) M`` and, when β2 < 1, the uncertainty
``Ū ← β2 Ū + (1 − β2) |M − Ī|`` (Ī already updated, as PLATON does); the entry score is
Ī·Ū, or Ī alone with β2 = 1 (the paper's score and every reference script's setting).
A row's score is the mean of its entries' scores.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError


def sensitivity(param: torch.Tensor) -> torch.Tensor:
    """|p ⊙ p.grad| in float32; zeros when the parameter has no gradient."""
    if param.grad is None:
        return torch.zeros(param.shape, dtype=torch.float32, device=param.device)
    return (param.detach().float() * param.grad.float()).abs_()


class RowSensitivity:
    """Windowed EMA of sensitivities, reduced to row scores, for any number of named matrices.

    Ī starts at 0 (and Ū too), so the first window gives Ī = (1 − β1)·M, as the reference code
    does; METHODS.md's ``Ī_t = β1 Ī_{t−1} + (1 − β1) I_t`` leaves Ī_0 open and 0 is its reading.
    With β2 = 1 the row score is linear in the entries, so only per-row sums are kept (float64,
    size out): exactly the mean over the row of the per-entry EMA, without an out x in state.
    β2 < 1 needs the per-entry Ī and Ū (two out x in float32 tensors per matrix, plus the window).
    """

    def __init__(self, beta1: float = 0.85, beta2: float = 1.0):
        if not 0 <= beta1 < 1:
            raise ConfigError(f"beta1 {beta1} must be in [0, 1): it is the EMA's memory, e.g. 0.85")
        if not 0 < beta2 <= 1:
            raise ConfigError(f"beta2 {beta2} must be in (0, 1]: 1 turns the uncertainty term off, e.g. 0.95 turns it on")
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self._state: dict[str, dict] = {}

    @property
    def per_entry(self) -> bool:
        return self.beta2 < 1

    def names(self) -> list[str]:
        return list(self._state)

    def accumulate(self, name: str, sensitivity: torch.Tensor) -> None:
        """Add one step's |S ⊙ ∇S| (out x in) of matrix ``name`` to the current window."""
        if sensitivity.dim() != 2:
            raise ConfigError(f"sensitivity of {name} must be out x in, got shape {tuple(sensitivity.shape)}")
        state = self._state.get(name)
        if state is None:
            state = self._state[name] = self._new_state(sensitivity)
        elif tuple(sensitivity.shape) != state["shape"]:
            raise ConfigError(f"sensitivity of {name} has shape {tuple(sensitivity.shape)}, earlier {state['shape']}: one name per matrix")
        if self.per_entry:
            state["window"].add_(sensitivity.to(torch.float32))
        else:
            state["window"].add_(sensitivity.sum(1, dtype=torch.float64))
        state["count"] += 1

    def _new_state(self, sensitivity: torch.Tensor) -> dict:
        out, device = sensitivity.shape[0], sensitivity.device
        if self.per_entry:
            def zeros():
                return torch.zeros(sensitivity.shape, dtype=torch.float32, device=device)
            return {"shape": tuple(sensitivity.shape), "count": 0, "window": zeros(), "ipt": zeros(), "unc": zeros()}
        def row_zeros():
            return torch.zeros(out, dtype=torch.float64, device=device)
        return {"shape": tuple(sensitivity.shape), "count": 0, "window": row_zeros(), "ipt": row_zeros()}

    def close_window(self) -> None:
        """Fold each matrix's window mean into its EMAs and start a new window (names with no step are left as they are)."""
        for state in self._state.values():
            if state["count"] == 0:
                continue
            mean = state["window"] / state["count"]
            state["ipt"].mul_(self.beta1).add_(mean, alpha=1 - self.beta1)
            if self.per_entry:
                state["unc"].mul_(self.beta2).add_((mean - state["ipt"]).abs_(), alpha=1 - self.beta2)
            state["window"].zero_()
            state["count"] = 0

    def row_scores(self, name: str) -> torch.Tensor:
        """(out,) float32: the mean over each row of Ī (β2 = 1) or Ī·Ū (β2 < 1); zeros before the first window closes."""
        if name not in self._state:
            raise KeyError(f"no sensitivity accumulated for {name!r}; known: {self.names()}")
        state = self._state[name]
        if self.per_entry:
            return (state["ipt"] * state["unc"]).mean(1)
        return (state["ipt"] / state["shape"][1]).to(torch.float32)

    def state_dict(self) -> dict:
        """Everything needed for an exact resume (tensors cloned)."""
        return {
            "beta1": self.beta1,
            "beta2": self.beta2,
            "matrices": {
                name: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
                for name, state in self._state.items()
            },
        }

    def load_state_dict(self, state: dict) -> None:
        if (state["beta1"], state["beta2"]) != (self.beta1, self.beta2):
            raise ConfigError(
                f"saved sensitivities use beta1={state['beta1']}, beta2={state['beta2']}, this run {self.beta1}, {self.beta2}: "
                "resume with the same betas"
            )
        self._state = {
            name: {k: v.clone() if isinstance(v, torch.Tensor) else (tuple(v) if k == "shape" else v) for k, v in matrix.items()}
            for name, matrix in state["matrices"].items()
        }


def global_row_mask(scores: dict[str, torch.Tensor], row_costs: dict[str, int], budget: int,
                    alive: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """One global threshold over the rows of all matrices, with the budget in parameters.

    A row of matrix ``name`` costs ``row_costs[name]`` (its width). Rows are taken in decreasing
    score, ties by (name order as given, row index), and the longest prefix whose cumulative
    cost is <= ``budget`` is kept: kept cost <= budget < kept cost + the next row's cost. Rows
    where ``alive[name]`` is False are never kept and cost nothing; NaN scores rank last.
    Returns name -> (out,) bool.
    """
    if budget < 0:
        raise ConfigError(f"row budget {budget} must be >= 0 parameters")
    if set(scores) != set(row_costs):
        raise ConfigError(f"scores and row_costs must name the same matrices: {sorted(set(scores) ^ set(row_costs))} differ")
    names = list(scores)
    if not names:
        return {}
    flat_scores, flat_costs, alive_flags, sizes = [], [], [], []
    for name in names:
        s = scores[name]
        if s.dim() != 1:
            raise ConfigError(f"row scores of {name} must be 1-D (one per output row), got shape {tuple(s.shape)}")
        if row_costs[name] < 1:
            raise ConfigError(f"row cost of {name} is {row_costs[name]}: give its width (in_features), >= 1")
        live = torch.ones(len(s), dtype=torch.bool) if alive is None or name not in alive else alive[name].to("cpu", torch.bool)
        if live.shape != s.shape:
            raise ConfigError(f"alive mask of {name} has shape {tuple(live.shape)}, its scores {tuple(s.shape)}: one flag per row")
        flat_scores.append(s.detach().to("cpu", torch.float64))
        flat_costs.append(torch.full((len(s),), int(row_costs[name]), dtype=torch.int64))
        alive_flags.append(live)
        sizes.append(len(s))
    score = torch.cat(flat_scores)
    score = torch.where(score.isnan(), -torch.inf, score)
    cost = torch.cat(flat_costs)
    live = torch.cat(alive_flags)
    # a stable sort keeps the (name order, row index) order among equal scores
    candidates = live.nonzero().squeeze(1)
    order = candidates[torch.sort(score[candidates], descending=True, stable=True).indices]
    taken = int((cost[order].cumsum(0) <= budget).sum())  # cumulative cost only grows: a prefix
    keep = torch.zeros(len(score), dtype=torch.bool)
    keep[order[:taken]] = True
    return {name: part.to(scores[name].device) for name, part in zip(names, keep.split(sizes))}
