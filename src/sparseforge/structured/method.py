"""TranSpa during training (METHODS.md section 6): rounds of coupled Fisher + coupled L1 removal.

While the model trains, one callback accumulates the coupled empirical Fisher of every
couple after each backward; every ``round_steps`` optimizer steps, while the model has
more parameters than the target, it plans a round (``plan_round``: the K fraction of
least important couples, the θ rule on their units, the free or uniform layout), trims it
to the target (``clamp_plan``), removes the units physically from the model AND the AdamW
moments (``apply_plan``), and starts a new Fisher round. Once the target is reached (within
half the layout's finest removal, ``finest_removal``: ``clamp_plan`` takes a crossing removal
only if it overshoots by no more than its absence falls short), the model keeps training at
that size.

Shrink schedule: ``theta`` (the paper's) lets each round remove what its θ rule says, so two scorers
reach the target at different steps; ``linear`` caps every round so the parameter count never
falls below a straight line from the start to the target at ``reach_by`` of the steps. Methods
on the same linear schedule follow the same parameter trajectory as long as their θ rules
remove at least the line's share per round (a round that removes less lags, and the next
rounds catch up); the report gives the largest lag.

- ``transpa``: units scored, by default, by their measured contribution (``--unit-score
  activation``: the consuming matrix's column norms times the RMS of the unit's activation
  over the round's batches, see ``activations.py``), or by the paper's coupled L1 product
  ``‖W1[:, i]‖₁ · ‖W2[i, :]‖₁`` (``--unit-score l1``).
- ``structured-l1``: the uncoupled ablation, each matrix's rows / columns by their own L1
  norm; same Fisher selection, same rounds and target, so the same parameter trajectory
  up to one removal per round.
- ``--couple-score magnitude`` (any variant): the L1-only estimation ablation; couples are
  selected by the mean |w| of their slices (``magnitude_scores``, read at the round) instead of
  the coupled Fisher, which is then not accumulated.
- ``tsvd``: the truncated-SVD ablation (``truncated_svd.py``): a selected couple loses as
  many units as the θ rule on its coupled L1 masses says, but they are the weakest singular
  directions of its coupled product (a couple that loses units is first rewritten in its
  SVD basis); same selection, rounds and target.

Budget: ``target_params`` is a fraction of ALL the model's parameters (embeddings
included, tied weights once); only the blocks shrink, so the target must leave room for
the embeddings and every other non-block parameter.

Resume: the callback's state holds every applied plan; ``before_load`` replays them on
the freshly built model before accelerate loads the checkpoint's weights and optimizer
state, so the shapes match and the run continues exactly.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields

import torch

from ..errors import ConfigError
from ..models import get_adapter
from ..options import COUPLE_SCORES, SHRINK_SCHEDULES, UNIT_SCORES
from ..train.trainer import Callback
from .activations import ActivationStats
from .couples import block_attention, compact_capable, ffn_couple
from .importance import CoupledFisher, magnitude_scores
from .plain_config import allowed_group_counts, config_keys
from .select import LAYOUTS, RemovalPlan, clamp_plan, finest_removal, layout_floor, plan_round
from .surgery import apply_plan, uniform_config
from .truncated_svd import rotate_couples, spectrum

log = logging.getLogger(__name__)

VARIANTS = ("transpa", "structured-l1", "tsvd")
#: settings added after TranSpa checkpoints were first written (see TranSpaMethod.identity)
LATER_SETTINGS = ("shrink_schedule", "reach_by", "couple_score")
#: transpa chooses its unit score; each ablation's score is its definition
#: (tsvd: as many units as the L1 θ rule removes, the weakest singular directions)
DEFAULT_UNIT_SCORE = {"transpa": "activation", "structured-l1": "l1", "tsvd": "l1-count-svd-directions"}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class TranSpaConfig:
    """Settings of TranSpa and its uncoupled ablation; see the module docstring."""

    method: str = "transpa"
    target_params: float = 0.7
    round_steps: int = 10
    fraction: float = 0.3
    theta: float = 0.9
    layout: str = "uniform"
    unit_score: str | None = None  # None: the variant's default (DEFAULT_UNIT_SCORE)
    shrink_schedule: str = "theta"  # theta: each round removes what the θ rule says; linear: capped by a line
    reach_by: float = 0.6  # linear: the share of the steps at which the line reaches the target
    couple_score: str = "fisher"  # fisher: coupled Fisher (the paper's); magnitude: mean |w| (the ablation)

    def __post_init__(self):
        if self.method not in VARIANTS:
            raise ConfigError(f"TranSpa variant '{self.method}' unknown: choose from {', '.join(VARIANTS)}")
        if self.unit_score is None:
            self.unit_score = DEFAULT_UNIT_SCORE[self.method]
        if self.method != "transpa" and self.unit_score != DEFAULT_UNIT_SCORE[self.method]:
            what = {"structured-l1": "each matrix's rows / columns by their own L1 norms",
                    "tsvd": "singular directions of each coupled product, as many as the coupled L1 θ rule removes"}
            raise ConfigError(f"{self.method} ranks {what[self.method]} (its definition): drop --unit-score, or use "
                              "--method transpa")
        if self.method == "transpa" and self.unit_score not in UNIT_SCORES:
            raise ConfigError(f"--unit-score '{self.unit_score}' unknown: choose activation (measured contribution) "
                              "or l1 (the paper's coupled L1 product)")
        if not (_finite(self.target_params) and 0 < self.target_params < 1):
            raise ConfigError(f"--target-params {self.target_params} must be in (0, 1): the fraction of the model's "
                              "parameters (embeddings included) to reach, e.g. 0.7")
        if not (isinstance(self.round_steps, int) and self.round_steps >= 1):
            raise ConfigError(f"--round-steps {self.round_steps} must be a whole number of steps, at least 1")
        if not (_finite(self.fraction) and 0 < self.fraction < 1):
            raise ConfigError(f"--fraction {self.fraction} must be in (0, 1): the share K of couples each round selects, e.g. 0.3")
        if not (_finite(self.theta) and 0 < self.theta < 1):
            raise ConfigError(f"--theta {self.theta} must be in (0, 1): the unit mass each selected couple keeps, e.g. 0.9")
        if self.shrink_schedule not in SHRINK_SCHEDULES:
            raise ConfigError(f"--shrink-schedule '{self.shrink_schedule}' unknown: choose theta (each round removes what its θ rule "
                              "says) or linear (rounds capped by a line from the start to the target)")
        if not (_finite(self.reach_by) and 0 < self.reach_by <= 1):
            raise ConfigError(f"--reach-by {self.reach_by} must be in (0, 1]: the share of --steps at which the linear "
                              "schedule reaches the target, e.g. 0.6")
        if self.couple_score not in COUPLE_SCORES:
            raise ConfigError(f"--couple-score '{self.couple_score}' unknown: choose fisher (coupled Fisher over the "
                              "round's batches) or magnitude (mean |w| of each couple, the L1-only ablation)")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"--layout '{self.layout}' unknown: choose uniform (a plain HF checkpoint) or free "
                              "(per-layer sizes, loads with sparseforge.load_model)")


def count_parameters(model) -> int:
    """Parameters of the model, tied ones once."""
    return sum(p.numel() for p in model.parameters())


def block_parameters(model) -> int:
    return sum(p.numel() for block in get_adapter(model).blocks for p in block.parameters())


def layer_sizes(model) -> list[dict]:
    """Per block: FFN width, KV groups, and each group's QK-pair / V dims and query heads."""
    adapter = get_adapter(model)
    out = []
    for i in range(len(adapter.blocks)):
        layout = block_attention(model, i, adapter).layout
        out.append({"block": i, "ffn": ffn_couple(model, i, adapter).units, "kv_groups": layout.num_groups,
                    "heads": layout.num_heads,
                    "groups": [{"qk_dim": layout.qk_dim(g), "v_dim": layout.v_dim(g)} for g in range(layout.num_groups)]})
    return out


def estimated_rounds(block: int, target_block: int, fraction: float, theta: float) -> int:
    """Rounds to shrink ``block`` block parameters to ``target_block`` if each round removes K·(1−θ) of them
    (the θ rule on evenly spread unit masses; concentrated masses remove more)."""
    if target_block >= block:
        return 0
    per_round = fraction * (1 - theta)
    return math.ceil(math.log(target_block / block) / math.log(1 - per_round) - 1e-9)


def _at_least(parameters: int, total: int) -> str:
    """The smallest 4-decimal fraction of ``total`` whose target is at least ``parameters``."""
    return f"{math.ceil(parameters / total * 1e4) / 1e4:.4f}"


def _is_ffn(couple: str) -> bool:
    return couple.rpartition(":")[2] == "ffn"


def _ffn_only(model, layout: str) -> bool:
    keys = config_keys(get_adapter(model))
    return layout == "uniform" and keys is not None and keys["head_dim"] is None


class StructuredRounds(Callback):
    """Coupled Fisher after every backward (``--couple-score fisher``); a removal round every ``round_steps`` steps
    until the target."""

    def __init__(self, config: TranSpaConfig, target: int, fraction: float, ffn_only: bool = False,
                 tolerance: int = 0, reach_step: int | None = None):
        self.config = config
        self.reach_step = reach_step  # linear schedule: the step at which the line meets the target
        self.ffn_only = ffn_only  # uniform layout of a family that derives its head size from hidden / heads
        self.target = target
        self.tolerance = tolerance  # half the layout's finest removal: closer than this, the target is reached
        self.fraction = fraction
        self.fisher = CoupledFisher()
        self.stats = ActivationStats() if config.unit_score == "activation" else None
        self.carry: dict[str, float] = {}
        self.plans: list[dict] = []  # every applied plan, in order (replayed on resume)
        self.trajectory: list[dict] = []  # {"step", "parameters"} at the start and after each round that removed units
        self.rounds = 0

    @staticmethod
    def _model(trainer):
        return trainer.accelerator.unwrap_model(trainer.model)

    def allowed(self, step: int) -> int:
        """The fewest parameters the schedule allows after a round at ``step``: the target (theta), else the line
        from the start (``trajectory[0]``) to the target at ``reach_step``."""
        if self.reach_step is None or not self.trajectory:
            return self.target
        start = self.trajectory[0]["parameters"]
        left = max(0, self.reach_step - step)
        return self.target - (-(start - self.target) * left // self.reach_step)  # ceil, in integers

    def shrinking(self, parameters: int) -> bool:
        """True while rounds remain: the model is above the target by more than the tolerance."""
        return parameters > self.target + self.tolerance

    def _unit_scorer(self):
        if self.config.method == "structured-l1":
            return "structured-l1"
        if self.config.method == "tsvd":
            return spectrum
        return self.stats.unit_scores if self.stats is not None else "coupled-l1"

    def _watch(self, model) -> None:
        """(Re)hook the activation statistics on the model's current layers while rounds remain."""
        if self.stats is not None:
            self.stats.detach()
            if self.shrinking(count_parameters(model)):
                self.stats.attach(model)

    def on_train_begin(self, trainer) -> None:
        model = self._model(trainer)
        if not self.trajectory:
            self.trajectory.append({"step": trainer.step, "parameters": count_parameters(model)})
        self._watch(model)

    def on_train_end(self, trainer) -> None:
        if self.stats is not None:
            self.stats.detach()

    @property
    def by_fisher(self) -> bool:
        return self.config.couple_score == "fisher"

    def on_gradients(self, trainer) -> None:
        model = self._model(trainer)
        if self.by_fisher and self.shrinking(count_parameters(model)):
            self.fisher.accumulate(model)

    @torch.no_grad()
    def on_optimizer_step(self, trainer) -> None:
        if trainer.step % self.config.round_steps:
            return
        model = self._model(trainer)
        current = count_parameters(model)
        if not self.shrinking(current) or (self.by_fisher and not self.fisher.batches):
            return
        allowed = self.allowed(trainer.step)
        if current <= allowed + self.tolerance:  # ahead of the line: keep gathering this round's statistics
            return
        scores = self.fisher.scores() if self.by_fisher else magnitude_scores(model)
        plan, self.carry = plan_round(model, scores, layout=self.config.layout, fraction=self.fraction,
                                      theta=self.config.theta, unit_scorer=self._unit_scorer(),
                                      carry=self.carry)
        if self.ffn_only:  # a plain checkpoint of this family cannot drop heads: FFN units only
            plan = RemovalPlan([i for i in plan.items if all(_is_ffn(n) for n in i.units)], plan.layout)
            self.carry["attention_parameters"] = 0.0
        plan = clamp_plan(model, plan, current - allowed)
        self.rounds += 1
        self.fisher.reset()  # a new round begins, whether or not this one removed anything
        if self.stats is not None:
            self.stats.reset()
        if not plan.items:  # the uniform layout may carry a round's removals over to the next
            log.info("%s round %d at step %d: nothing removed yet (carried over: %s)", self.config.method, self.rounds,
                     trainer.step, {k: round(v, 1) for k, v in self.carry.items()})
            return
        if self.config.method == "tsvd":  # the units removed are the product's last singular directions
            rotate_couples(model, plan.units(), trainer.optimizer)
        apply_plan(model, plan, trainer.optimizer, self.config.layout)
        self._watch(model)  # the hooked layers may have been replaced (compact attention) or be done
        self.plans.append(plan.to_dict())
        after = count_parameters(model)
        point = {"step": trainer.step, "parameters": after}
        if self.reach_step is not None:
            point["allowed"] = allowed
        self.trajectory.append(point)
        log.info("%s round %d at step %d: %d -> %d parameters (target %d)", self.config.method, self.rounds,
                 trainer.step, current, after, self.target)

    def on_step_end(self, trainer, record: dict) -> None:
        record["parameters"] = self.trajectory[-1]["parameters"] if self.trajectory else None

    def before_load(self, trainer, state: dict | None) -> None:
        """Replay the checkpoint's plans on the fresh model, so its shapes match the saved weights and moments."""
        if not state or self.plans:
            return
        model = self._model(trainer)
        for data in state.get("plans", []):
            apply_plan(model, RemovalPlan.from_dict(data), trainer.optimizer, self.config.layout)
        log.info("re-applied %d removal rounds before loading the checkpoint: %d parameters",
                 len(state.get("plans", [])), count_parameters(model))

    def state_dict(self) -> dict:
        return {"fisher": self.fisher.state_dict(), "carry": dict(self.carry), "plans": list(self.plans),
                "trajectory": list(self.trajectory), "rounds": self.rounds,
                "activations": self.stats.state_dict() if self.stats is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.fisher.load_state_dict(state["fisher"])
        self.carry = dict(state["carry"])
        self.plans = list(state["plans"])
        self.trajectory = list(state["trajectory"])
        self.rounds = int(state["rounds"])
        if self.stats is not None and state.get("activations") is not None:
            self.stats.load_state_dict(state["activations"])


class TranSpaMethod:
    """The train-time method object the shared run drives: prepare, callbacks, finish."""

    def __init__(self, config: TranSpaConfig, steps: int):
        self.config = config
        self.steps = steps
        if steps // config.round_steps == 0:
            raise ConfigError(f"--round-steps {config.round_steps} exceeds --steps {steps}: no removal round "
                              "would run; lower --round-steps or raise --steps")
        self.callback: StructuredRounds | None = None
        self.info: dict = {}

    def identity(self) -> dict:
        """The settings a checkpoint must share to resume; settings added later are left out at their defaults, so a
        checkpoint written before they existed still resumes."""
        later = {f.name: f.default for f in fields(TranSpaConfig) if f.name in LATER_SETTINGS}
        return {"transpa": {k: v for k, v in asdict(self.config).items() if k not in later or later[k] != v}}

    def check(self, model) -> tuple[int, int, int, int]:
        """(parameters, block parameters, the rest, target); ConfigError if the target is below the rest or below
        the fewest parameters the layout can reach (``layout_floor``)."""
        total = count_parameters(model)
        block = block_parameters(model)
        outside = total - block
        target = int(self.config.target_params * total)
        if target <= outside:
            raise ConfigError(f"--target-params {self.config.target_params} is below the parameters outside the blocks "
                              f"(embeddings, norms, head: {outside / total:.4f} of {total:,}): only the blocks shrink, "
                              f"choose a target above {outside / total:.4f}")
        floor = layout_floor(model, self.config.layout)
        if target < floor:
            raise ConfigError(self._unreachable(model, total, floor))
        return total, block, outside, target

    def _unreachable(self, model, total: int, floor: int) -> str:
        """The one-line refusal of a target below ``floor``, the fewest parameters the layout reaches."""
        config = self.config
        if config.layout == "free":
            what = "one unit in every couple" if compact_capable(model) else "one KV group per layer, FFN width 1"
            hint = ""
        else:
            if _ffn_only(model, config.layout):
                family = type(get_adapter(model)).__name__.removesuffix("Adapter")
                what = f"a plain {family} checkpoint keeps every attention head, FFN width 1"
            else:
                groups = min(allowed_group_counts(model))
                what = f"{groups} KV group{'s' if groups > 1 else ''} per layer (the fewest its config accepts), FFN width 1"
            free = layout_floor(model, "free")
            hint = f", or use --layout free (it reaches {_at_least(free, total)})" if free < floor else ""
        return (f"--target-params {config.target_params} is below what the {config.layout} layout can reach ({what}: "
                f"{floor:,} of {total:,} parameters): choose --target-params {_at_least(floor, total)} or more{hint}")

    def prepare(self, model) -> dict:
        config = self.config
        for p in model.parameters():
            p.requires_grad_(True)
        total, block, outside, target = self.check(model)
        rounds = self.steps // config.round_steps
        target_block = target - outside
        fraction = config.fraction
        needed = estimated_rounds(block, target_block, fraction, config.theta)
        adapted = None
        if needed > rounds:
            # the smallest K whose estimate fits the rounds: (1 - K(1-θ))^rounds <= target_block / block
            k = (1 - (target_block / block) ** (1 / rounds)) / (1 - config.theta)
            if k >= 1:
                raise ConfigError(f"{rounds} rounds (--steps {self.steps} // --round-steps {config.round_steps}) cannot "
                                  f"reach --target-params {config.target_params}: each round removes about K*(1-θ) = at most "
                                  f"{1 - config.theta:.2f} of the block parameters; raise --steps, lower --round-steps "
                                  "or --theta")
            fraction = min(1.0, math.ceil(k * 100) / 100)
            adapted = fraction
            log.warning("%s: at K=%.2f, θ=%.2f reaching the target needs about %d rounds, the run has %d: K raised to %.2f",
                        config.method, config.fraction, config.theta, needed, rounds, fraction)
        ffn_only = _ffn_only(model, config.layout)
        if ffn_only:
            log.warning("%s: %s derives its head size from hidden_size / heads, so the uniform layout (a plain "
                        "checkpoint) removes FFN units only; use --layout free to shrink attention too",
                        config.method, type(get_adapter(model)).__name__.removesuffix("Adapter"))
        tolerance = finest_removal(model, config.layout) // 2
        reach_step = max(1, round(config.reach_by * self.steps)) if config.shrink_schedule == "linear" else None
        self.callback = StructuredRounds(config, target, fraction, ffn_only, tolerance, reach_step)
        self.info = {"config": asdict(config), "parameters": {"start": total, "blocks": block, "outside_blocks": outside,
                                                              "target": target, "tolerance": tolerance},
                     "rounds_available": rounds, "rounds_estimated": estimated_rounds(block, target_block, fraction,
                                                                                       config.theta),
                     "fraction_used": fraction, "fraction_adapted": adapted is not None, "ffn_only": ffn_only,
                     "schedule": {"kind": config.shrink_schedule, "reach_step": reach_step}}
        log.info("%s: %d parameters (%d in the blocks) -> target %d, a round every %d steps (%d rounds available), "
                 "K %.2f θ %.2f, %s layout, couples selected by %s, units scored by %s", config.method, total, block,
                 target, config.round_steps, rounds, fraction, config.theta, config.layout, config.couple_score,
                 config.unit_score)
        return dict(self.info)

    def callbacks(self) -> list[Callback]:
        return [self.callback] if self.callback else []

    def finish(self, model):
        """Uniform layout: the config follows the new sizes (a plain HF checkpoint); report the trajectory and sizes."""
        callback = self.callback
        total = count_parameters(model)
        reached = not callback.shrinking(total)
        if not reached:
            log.warning("%s: the run ended at %d parameters, above the target %d (± %d): raise --steps or lower "
                        "--round-steps", self.config.method, total, callback.target, callback.tolerance)
        if self.config.layout == "uniform":
            model.config.update(uniform_config(model))
        schedule = dict(self.info["schedule"])
        if callback.reach_step is not None:
            schedule["max_lag"] = self.max_lag()
        return model, {"trajectory": list(callback.trajectory), "rounds": callback.rounds, "schedule": schedule,
                       "rounds_removing": len(callback.plans), "reached_target": reached,
                       "final_parameters": {"total": total, "blocks": block_parameters(model),
                                            "fraction": total / self.info["parameters"]["start"]},
                       "layers": layer_sizes(model), "layout": self.config.layout}


    def max_lag(self) -> int:
        """Linear schedule: the most parameters the model held above the line at any round's end (0: on it).
        Between rounds the count stays where the last round left it, so the lag is checked at every round step
        up to the one that reached the target."""
        callback = self.callback
        points = callback.trajectory
        lag = 0
        for step in range(self.config.round_steps, self.steps + 1, self.config.round_steps):
            held = next(p["parameters"] for p in reversed(points) if p["step"] <= step)
            lag = max(lag, held - callback.allowed(step) - callback.tolerance)
            if not callback.shrinking(held):
                break
        return lag


def build_method(name: str, steps: int, options: dict) -> TranSpaMethod:
    """The method-index entry point of TranSpa and its uncoupled ablation."""
    return TranSpaMethod(TranSpaConfig(method=name, **options), steps)
