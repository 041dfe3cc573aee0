"""LoSparse and its baselines during training (METHODS.md section 5): reparametrise, prune rows, compact.

Every block linear becomes ``W ≈ U V + S`` (``LoSparseLinear``); while the
model trains, S's output rows are scored by their smoothed sensitivity
``|S ⊙ ∇S|`` and pruned to the cubic schedule's budget with ONE global
threshold counted in parameters; at the end each layer is replaced by its
compact form (U, V and S's surviving rows with their indices).

Budget: ``keep`` is the fraction of the target linears' parameters that
remain, U and V included: ``keep = lowrank part + S part``. Embeddings and a
task head stay dense and are outside the budget.

- ``losparse``: rank ``ceil(ρ·out·in/(out+in))`` per matrix, S pruned to ``keep − lowrank part``.
- ``itp``: no low-rank part (rank 0, S = W): the same scores and schedule on W's rows.
- ``lowrank``: U V only (S has no rows from the start), rank ``ceil(keep·out·in/(out+in))``.

Pruned rows: by default they stay pruned — the forward multiplies S by the
row mask, so no gradient reaches a pruned row and the function being trained
is exactly the compact one. The reference code instead zeroes pruned rows at
each masking and lets AdamW update them in between (they may come back at the
next masking); ``pruned_rows="train"`` does that.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch

from ..errors import ConfigError
from ..models.modules import block_linears, replace_module
from ..options import PRUNED_ROWS
from ..sparsity.schedule import CubicSchedule
from ..train.trainer import Callback
from .decompose import rank_for_ratio
from .importance import RowSensitivity, global_row_mask, sensitivity
from .layers import CompactLoSparseLinear, LoSparseLinear

log = logging.getLogger(__name__)

VARIANTS = ("losparse", "itp", "lowrank")


@dataclass
class LoSparseConfig:
    """Settings of LoSparse and its baselines; see the module docstring."""

    method: str = "losparse"
    keep: float = 0.15
    rank_ratio: float = 0.05
    beta1: float = 0.85
    beta2: float = 1.0
    initial_steps: int | None = None
    final_steps: int | None = None
    interval: int | None = None
    pruned_rows: str = "stay"

    def __post_init__(self):
        if self.method not in VARIANTS:
            raise ConfigError(f"LoSparse variant '{self.method}' unknown: choose from {', '.join(VARIANTS)}")
        if not (isinstance(self.keep, (int, float)) and math.isfinite(self.keep) and 0 < self.keep <= 1):
            raise ConfigError(f"--keep {self.keep} must be in (0, 1]: the fraction of the block linears' parameters that remain")
        if not (math.isfinite(self.rank_ratio) and 0 <= self.rank_ratio < 1):
            raise ConfigError(f"--rank-ratio {self.rank_ratio} must be in [0, 1), e.g. 0.05")
        if self.method == "losparse" and self.keep <= self.rank_ratio:
            raise ConfigError(f"--keep {self.keep} does not exceed the low-rank part alone (--rank-ratio {self.rank_ratio}): "
                              "raise --keep or lower --rank-ratio")
        if not 0 <= self.beta1 < 1 or not 0 < self.beta2 <= 1:
            raise ConfigError(f"--beta1 {self.beta1} must be in [0, 1) and --beta2 {self.beta2} in (0, 1]")
        if self.pruned_rows not in PRUNED_ROWS:
            raise ConfigError(f"--pruned-rows '{self.pruned_rows}' unknown: choose from {', '.join(PRUNED_ROWS)}")


def plan_ranks(shapes: dict[str, tuple[int, int]], config: LoSparseConfig) -> tuple[dict[str, int], float]:
    """Rank per layer and the kept fraction left for S (of all target parameters).

    Raises ConfigError when the low-rank part alone spends the budget."""
    total = sum(o * i for o, i in shapes.values())
    if config.method == "itp":
        return {name: 0 for name in shapes}, config.keep
    ratio = config.keep if config.method == "lowrank" else config.rank_ratio
    ranks = {name: rank_for_ratio(o, i, ratio) for name, (o, i) in shapes.items()}
    lowrank_share = sum(r * sum(shapes[n]) for n, r in ranks.items()) / total
    if config.method == "lowrank":
        return ranks, 0.0
    sparse_share = config.keep - lowrank_share
    if sparse_share <= 0:
        raise ConfigError(f"--keep {config.keep} is below the low-rank part alone ({lowrank_share:.4f} at --rank-ratio "
                          f"{config.rank_ratio}): raise --keep or lower --rank-ratio")
    return ranks, sparse_share


def losparse_layers(model) -> dict[str, LoSparseLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoSparseLinear)}


class RowPruning(Callback):
    """Reads S's sensitivities before each optimizer step; prunes rows to the schedule after it."""

    def __init__(self, model, schedule: CubicSchedule, beta1: float, beta2: float):
        self.layers = losparse_layers(model)
        self.schedule = schedule
        self.scores = RowSensitivity(beta1, beta2)
        self.total = sum(layer.out_features * layer.in_features for layer in self.layers.values())
        self.row_costs = {name: layer.in_features for name, layer in self.layers.items()}
        self.sticky = all(layer.mask_in_forward for layer in self.layers.values())
        self.maskings = 0

    def on_gradients(self, trainer) -> None:
        for name, layer in self.layers.items():
            self.scores.accumulate(name, sensitivity(layer.sparse))
        if (trainer.step + 1) % self.schedule.interval == 0:  # one EMA update per window of ΔT steps
            self.scores.close_window()

    def budget(self, step: int) -> int:
        return int(self.schedule.kept_fraction(step) * self.total)

    @torch.no_grad()
    def on_optimizer_step(self, trainer) -> None:
        step = trainer.step
        if not self.schedule.is_masking_step(step):
            return
        scores = {name: self.scores.row_scores(name) for name in self.layers}
        alive = {name: layer.row_mask for name, layer in self.layers.items()} if self.sticky else None
        keep = global_row_mask(scores, self.row_costs, self.budget(step), alive)
        for name, layer in self.layers.items():
            layer.apply_row_mask(keep[name])
        self.maskings += 1

    def on_step_end(self, trainer, record: dict) -> None:
        kept = sum(layer.kept_rows() * layer.in_features for layer in self.layers.values())
        record["sparse_kept_fraction"] = kept / self.total

    def state_dict(self) -> dict:
        return {"scores": self.scores.state_dict(), "maskings": self.maskings}

    def load_state_dict(self, state: dict) -> None:
        self.scores.load_state_dict(state["scores"])
        self.maskings = state["maskings"]


class LoSparseMethod:
    """The train-time method object the shared run drives: prepare, callbacks, finish."""

    def __init__(self, config: LoSparseConfig, steps: int):
        self.config = config
        self.steps = steps
        self.schedule: CubicSchedule | None = None
        self.callback: RowPruning | None = None
        self.dense_target_parameters = 0

    def identity(self) -> dict:
        return {"losparse": asdict(self.config)}

    def check(self, model) -> None:
        """Refuse a budget the low-rank part alone spends, before any slow step (shapes only)."""
        plan_ranks(self._shapes(model), self.config)

    @staticmethod
    def _shapes(model) -> dict[str, tuple[int, int]]:
        return {name: tuple(_out_in(m)) for name, m in block_linears(model).items()}

    def prepare(self, model) -> dict:
        config = self.config
        targets = block_linears(model)
        shapes = self._shapes(model)
        ranks, sparse_share = plan_ranks(shapes, config)
        self.dense_target_parameters = sum(o * i for o, i in shapes.values())
        for name, module in targets.items():
            layer = LoSparseLinear.from_linear(module, ranks[name], mask_in_forward=config.pruned_rows == "stay")
            if config.method == "lowrank":  # no S at all: nothing of it trains
                layer.apply_row_mask(torch.zeros(layer.out_features, dtype=torch.bool))
                layer.sparse.requires_grad_(False)
            replace_module(model, name, layer)
        info = {"config": asdict(config), "targets": len(targets), "ranks": sorted(set(ranks.values())),
                "lowrank_share": sum(ranks[n] * sum(shapes[n]) for n in shapes) / self.dense_target_parameters,
                "sparse_share": sparse_share}
        if config.method != "lowrank":
            self.schedule = CubicSchedule.for_steps(self.steps, sparse_share, config.initial_steps, config.final_steps,
                                                    config.interval)
            self.callback = RowPruning(model, self.schedule, config.beta1, config.beta2)
            info["schedule"] = self.schedule.to_dict()
        log.info("%s: %d target linears, ranks %s, S keeps %.4f of their parameters at the end", config.method,
                 len(targets), info["ranks"], sparse_share)
        return info

    def callbacks(self) -> list[Callback]:
        return [self.callback] if self.callback else []

    def finish(self, model):
        """Replace every LoSparse layer by its compact form; report what remains."""
        layers = losparse_layers(model)
        per_layer = []
        for name, layer in layers.items():
            compact = layer.compact()
            replace_module(model, name, compact)
            bias = 0 if compact.bias is None else compact.bias.numel()
            per_layer.append({"name": name, "shape": [layer.out_features, layer.in_features], "rank": compact.rank,
                              "rows": compact.rows, "weights": compact.parameter_count() - bias, "bias": bias})
        kept = sum(layer["weights"] for layer in per_layer)
        # the budget is over the weight matrices; biases (never pruned) are reported apart
        return model, {"layers": per_layer, "target_parameters": {"dense": self.dense_target_parameters, "compact": kept,
                                                                  "kept_fraction": kept / self.dense_target_parameters,
                                                                  "biases": sum(layer["bias"] for layer in per_layer)},
                       "maskings": self.callback.maskings if self.callback else 0}


def _out_in(module) -> tuple[int, int]:
    from ..models.base import get_weight

    return tuple(get_weight(module).shape)


def densify(model) -> int:
    """Replace every compact LoSparse layer by a plain linear with the same outputs (vanilla-loadable, saves nothing)."""
    names = [name for name, m in model.named_modules() if isinstance(m, CompactLoSparseLinear)]
    for name in names:
        replace_module(model, name, model.get_submodule(name).to_linear())
    return len(names)


def build_method(name: str, steps: int, options: dict) -> LoSparseMethod:
    """The method-index entry point of the LoSparse family."""
    return LoSparseMethod(LoSparseConfig(method=name, **options), steps)
