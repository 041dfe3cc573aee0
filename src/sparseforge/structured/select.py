"""Choosing what a round removes: couples, units, budgets, and the two layouts.

Rules (all deterministic; ties are broken by name / index):

- ``select_couples(scores, K)``: the ⌈K·n⌉ couples (at least one) with the smallest Î.
- ``theta_rule(v, θ)``: with v normalised to sum 1 and sorted ascending, remove the
  longest prefix of smallest units whose removal keeps the kept mass ≥ θ, i.e. the first
  m units with Σ_{i≤m} v_(i) ≤ 1 − θ. A unit whose removal would take the kept mass
  below θ is never removed. (The paper's loop "while Σv > θ: remove the smallest" reads
  as removing one unit more, the one that crosses θ; we stop before it.) With θ > 0 at
  least one unit with positive mass is always kept.
- Priority of a removal (lower goes first when a budget trims a plan): the coupled
  importance mass it removes, Σ Î(couple) · v_u over its units.

Layouts (``plan_round``):

- ``free`` (the paper's): every selected couple loses the units the θ rule picks; FFN
  widths and per-group QK-pair / V sizes differ per layer (CompactAttention runs them).
  On a model whose attention cannot run per-group sizes (per-head q/k norms, e.g.
  Qwen3) the attention parameters the θ rule picks become a credit spent on WHOLE KV
  groups, lowest group importance first, anywhere (never a layer's last group).
- ``uniform`` (a plain HF checkpoint): the θ rule on the same selected couples sets the
  round's budget, spent uniformly. FFN: the number of units the free rule would remove
  (plus the carried remainder) is spread equally over the L layers (⌊n / L⌋ each, the
  rest carried to the next round); each layer removes its lowest-v units, slice by
  slice (slice k = every layer's k-th lowest unit). Attention: the attention parameters
  the free rule would remove accumulate as a credit. The group count per layer only
  steps between counts the model's plain config accepts (``allowed_group_counts``: e.g.
  LLaMA's config refuses heads that do not divide hidden_size): whenever the credit covers
  the step from the current count to the next accepted smaller one in every layer, every
  layer removes that many of its lowest-importance groups (group importance = Î(QK_g) +
  Î(VO_g)), whole, with their query heads, as one removal; head size unchanged, the
  query/KV ratio kept, at least one group per layer. The carry (FFN units, attention
  parameters) is returned for the next round: keep it in the callback's state.

``clamp_plan`` then trims a plan to a parameter budget: removals in priority order until
the budget is met. A removal that would cross the budget is taken only if it overshoots
by no more than leaving it out would fall short; otherwise it is skipped and cheaper
removals after it may still fit (a removal of a ``chain``, e.g. the uniform layout's
group steps, is never taken after a skipped one of the same chain). So the model ends
within half a removal of the target on either side: the uniform layout's 3 -> 2 KV-group
step (a third of the attention) is not taken when the target is a few FFN slices away.
``finest_removal`` is the layout's smallest step; the rounds stop within half of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from ..options import LAYOUTS
from .couples import Couple, build_couples, compact_capable, couple_name, unit_cost
from .importance import UNIT_SCORERS
from .plain_config import allowed_group_counts


@dataclass(frozen=True)
class Removal:
    """Units removed together (couple name -> unit indices), with their priority."""

    units: Mapping[str, tuple[int, ...]]
    priority: float = 0.0
    chain: str | None = None  # removals of one chain only go in order (a later one assumes the earlier)


@dataclass
class RemovalPlan:
    """What one round removes: a list of atomic removals (indices refer to the couples
    ``build_couples`` gives for the model as it is when the plan is made)."""

    items: list[Removal] = field(default_factory=list)
    layout: str = "free"

    @classmethod
    def from_units(cls, units: Mapping[str, Iterable[int]], layout: str = "free") -> RemovalPlan:
        """A plan of single-unit removals (priority 0), e.g. written by hand."""
        return cls([Removal({name: (int(u),)}) for name, us in units.items() for u in us], layout)

    def units(self) -> dict[str, list[int]]:
        """Couple name -> sorted unit indices to remove."""
        merged: dict[str, set[int]] = {}
        for item in self.items:
            for name, us in item.units.items():
                merged.setdefault(name, set()).update(int(u) for u in us)
        return {name: sorted(us) for name, us in merged.items() if us}

    def __len__(self) -> int:
        return len(self.items)

    def to_dict(self) -> dict:
        return {"layout": self.layout,
                "items": [{"units": {k: list(v) for k, v in i.units.items()}, "priority": i.priority} for i in self.items]}

    @classmethod
    def from_dict(cls, data: Mapping) -> RemovalPlan:
        return cls([Removal({k: tuple(int(u) for u in v) for k, v in i["units"].items()}, float(i["priority"]))
                    for i in data.get("items", [])], str(data.get("layout", "free")))


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ConfigError(f"layout '{layout}' unknown: choose uniform (a plain HF checkpoint) or free (per-layer sizes)")
    return layout


def select_couples(scores: Mapping[str, float], fraction: float = 0.3) -> list[str]:
    """The ⌈fraction·n⌉ couple names (at least one) with the smallest score, smallest first."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"couple fraction K {fraction} must be in (0, 1]: e.g. 0.3 selects the 30% least important couples")
    if not scores:
        return []
    count = max(1, math.ceil(fraction * len(scores) - 1e-9))
    return sorted(scores, key=lambda name: (scores[name], name))[:count]


def theta_rule(v: torch.Tensor, theta: float = 0.9) -> torch.Tensor:
    """Units to remove (smallest first): the longest prefix of ascending v whose removal keeps mass ≥ θ."""
    if not 0 < theta <= 1:
        raise ConfigError(f"threshold theta {theta} must be in (0, 1]: the share of a couple's L1 mass to keep, e.g. 0.9")
    v = torch.as_tensor(v, dtype=torch.float64).flatten()
    if v.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    total = float(v.sum())
    if total <= 0:
        return torch.zeros(0, dtype=torch.long)
    order = torch.sort(v, stable=True).indices
    removed_mass = torch.cumsum(v[order] / total, 0)
    count = int((removed_mass <= (1 - theta) + 1e-12).sum())
    return order[:count]


def normalize_units(couples: Iterable[Couple], units: Mapping[str, Iterable[int]]) -> dict[str, list[int]]:
    """Check a plan's units against the couples; a group whose VO units all go loses its QK units too
    (its output is zero whatever its scores: the masked model equals the model without the group)."""
    by_name = {c.name: c for c in couples}
    out: dict[str, list[int]] = {}
    for name, us in units.items():
        couple = by_name.get(name)
        if couple is None:
            raise ConfigError(f"the plan names couple '{name}', which the model does not have: make plans from the "
                              "model's current couples (build_couples after the last apply_plan)")
        us = sorted({int(u) for u in us})
        if us and not (0 <= us[0] and us[-1] < couple.units):
            raise ConfigError(f"the plan removes unit {us[-1] if us[-1] >= couple.units else us[0]} of '{name}', "
                              f"which has units 0..{couple.units - 1}: make plans from the model's current couples")
        if us:
            out[name] = us
    for couple in by_name.values():
        if couple.kind == "vo" and len(out.get(couple.name, ())) == couple.units:
            qk = couple_name(couple.name.rpartition(":")[0], "qk", couple.group)
            if qk in by_name:
                out[qk] = list(range(by_name[qk].units))
    return out


def plan_parameters(model: nn.Module, plan: RemovalPlan | Mapping[str, Iterable[int]], couples: list[Couple] | None = None) -> int:
    """Parameters (weights + biases) ``apply_plan`` would remove."""
    couples = couples if couples is not None else build_couples(model)
    units = normalize_units(couples, plan.units() if isinstance(plan, RemovalPlan) else plan)
    by_name = {c.name: c for c in couples}
    return sum(len(us) * unit_cost(model, by_name[name]) for name, us in units.items())


def layout_floor(model: nn.Module, layout: str) -> int:
    """The fewest parameters (tied once) rounds of ``layout`` can leave: every FFN at one unit; attention:
    ``free`` with compact attention, one unit per QK / VO couple (the θ rule keeps a unit with mass, the
    progress rule never takes a couple's last); whole KV groups otherwise, down to the smallest count a
    plain config accepts (``uniform``; a family deriving its head size keeps its heads) or one group per
    layer (``free`` without compact attention)."""
    check_layout(layout)
    couples = build_couples(model)
    costs = {c.name: unit_cost(model, c) for c in couples}
    per_unit = layout == "free" and compact_capable(model)
    removable = sum((c.units - 1) * costs[c.name] for c in couples if c.kind == "ffn" or per_unit)
    if not per_unit:
        keep = min(allowed_group_counts(model)) if layout == "uniform" else 1
        groups: dict[tuple[int, int], int] = {}
        for c in couples:
            if c.kind != "ffn":
                groups[c.block, c.group] = groups.get((c.block, c.group), 0) + c.units * costs[c.name]
        for block in {b for b, _ in groups}:
            block_costs = sorted(cost for (b, _), cost in groups.items() if b == block)
            removable += sum(block_costs[keep:])  # the cheapest ``keep`` stay: the floor is the fewest reachable
    return sum(p.numel() for p in model.parameters()) - removable


def _item_cost(item: Removal, costs: Mapping[str, int]) -> int:
    return sum(len(us) * costs[name] for name, us in item.units.items())


def clamp_plan(model: nn.Module, plan: RemovalPlan, max_parameters: int) -> RemovalPlan:
    """The plan trimmed to about ``max_parameters``: removals in priority order (stable) until the budget is
    reached; one that would cross it only if it overshoots by no more than its absence falls short (else skipped,
    with the rest of its chain)."""
    if max_parameters <= 0 or not plan.items:
        return RemovalPlan([], plan.layout)
    couples = build_couples(model)
    costs = {c.name: unit_cost(model, c) for c in couples}
    kept, total, broken = [], 0, set()
    for item in sorted(plan.items, key=lambda i: i.priority):
        if total >= max_parameters:
            break
        if item.chain is not None and item.chain in broken:
            continue
        cost = _item_cost(item, costs)
        if total + cost - max_parameters > max_parameters - total:
            if item.chain is not None:
                broken.add(item.chain)
            continue
        kept.append(item)
        total += cost
    return RemovalPlan(kept, plan.layout)


def finest_removal(model: nn.Module, layout: str) -> int:
    """Parameters of the smallest removal ``layout`` makes: one FFN unit (free), one FFN slice, a unit in every
    layer (uniform)."""
    check_layout(layout)
    costs = [unit_cost(model, c) for c in build_couples(model) if c.kind == "ffn"]
    return sum(costs) if layout == "uniform" else min(costs)


def _scorer(unit_scorer: str | Callable) -> Callable:
    if callable(unit_scorer):
        return unit_scorer
    if unit_scorer not in UNIT_SCORERS:
        raise ConfigError(f"unit scorer '{unit_scorer}' unknown: choose from {', '.join(UNIT_SCORERS)}")
    return UNIT_SCORERS[unit_scorer]


class _Round:
    """The couples, their unit costs and (lazily) unit scores of one model state, for one round's rules."""

    def __init__(self, model: nn.Module, scores: Mapping[str, float], scorer: Callable):
        self.model, self.scores, self.scorer = model, scores, scorer
        self.couples = build_couples(model)
        self.by_name = {c.name: c for c in self.couples}
        self.costs = {c.name: unit_cost(model, c) for c in self.couples}
        self.blocks = list(dict.fromkeys(c.name.rpartition(":")[0] for c in self.couples))  # block prefixes, in order
        self._v: dict[str, torch.Tensor] = {}

    def v(self, name: str) -> torch.Tensor:
        if name not in self._v:
            self._v[name] = self.scorer(self.model, self.by_name[name])
        return self._v[name]

    def removal(self, units: Mapping[str, tuple[int, ...]]) -> Removal:
        """A removal whose priority is the coupled importance mass it removes, Σ Î(couple) · v_u."""
        mass = sum(self.scores.get(name, 0.0) * float(self.v(name)[list(us)].sum()) for name, us in units.items())
        return Removal(dict(units), float(mass))

    def groups(self, block: str) -> list[int]:
        return sorted(c.group for c in self.couples if c.kind == "vo" and c.name.startswith(block + ":"))

    def group_units(self, block: str, group: int) -> dict[str, tuple[int, ...]]:
        names = [couple_name(block, "qk", group), couple_name(block, "vo", group)]
        return {n: tuple(range(self.by_name[n].units)) for n in names if n in self.by_name}

    def group_importance(self, block: str, group: int) -> float | None:
        """Î(QK_g) + Î(VO_g); None if the group's VO couple has no score."""
        vo = couple_name(block, "vo", group)
        if vo not in self.scores:
            return None
        return self.scores[vo] + self.scores.get(couple_name(block, "qk", group), 0.0)

    def ranked_groups(self, block: str) -> list[tuple[float, int]]:
        """(importance, group) of the block's scored groups, least important first."""
        scored = ((self.group_importance(block, g), g) for g in self.groups(block))
        return sorted((imp, g) for imp, g in scored if imp is not None)

    def group_cost(self, block: str, group: int) -> int:
        return sum(self.by_name[n].units * self.costs[n] for n in self.group_units(block, group))

    def theta_removals(self, fraction: float, theta: float, at_least_one: bool) -> list[Removal]:
        """The free rule: each selected couple's θ-rule units, one removal per unit."""
        selected = select_couples({n: s for n, s in self.scores.items() if n in self.by_name}, fraction)
        items = [self.removal({name: (u,)}) for name in selected for u in theta_rule(self.v(name), theta).tolist()]
        if at_least_one and not items:  # progress: the least important selected couple loses its lowest unit
            name = next((n for n in selected if self.by_name[n].units > 1), None)
            if name is not None:
                items.append(self.removal({name: (int(torch.sort(self.v(name), stable=True).indices[0]),)}))
        return items

    def cost(self, item: Removal) -> int:
        return _item_cost(item, self.costs)

    def is_ffn(self, item: Removal) -> bool:
        return all(self.by_name[n].kind == "ffn" for n in item.units)


def plan_round(model: nn.Module, scores: Mapping[str, float], *, layout: str = "free", fraction: float = 0.3,
               theta: float = 0.9, unit_scorer: str | Callable = "coupled-l1",
               carry: Mapping[str, float] | None = None, at_least_one: bool = True) -> tuple[RemovalPlan, dict[str, float]]:
    """One round's removal plan from couple scores (Î); returns (plan, carry for the next round).

    See the module docstring for the free and uniform rules. Not clamped: pass the plan
    to ``clamp_plan`` with the parameters left above the target. ``at_least_one``: when the
    θ rule removes nothing from any selected couple (small couples with even scores, e.g.
    8 rotary pairs at random init: every v_u > 1 − θ), the least important selected couple
    with more than one unit loses its lowest-v unit, so rounds always progress.
    """
    check_layout(layout)
    r = _Round(model, scores, _scorer(unit_scorer))
    carry = {"ffn_units": 0.0, "attention_parameters": 0.0, **(carry or {})}
    free = r.theta_removals(fraction, theta, at_least_one)
    ffn_units = sum(1 for i in free if r.is_ffn(i))
    credit = carry["attention_parameters"] + sum(r.cost(i) for i in free if not r.is_ffn(i))
    if layout == "free" and compact_capable(model):
        return RemovalPlan(free, "free"), dict(carry)
    if layout == "free":  # attention that cannot run per-group sizes: the credit buys whole groups
        groups, credit_left = _whole_groups_anywhere(r, credit)
        return RemovalPlan([i for i in free if r.is_ffn(i)] + groups, "free"), {**carry, "attention_parameters": credit_left}
    ffn_items, ffn_left = _uniform_ffn(r, carry["ffn_units"] + ffn_units)
    group_items, credit_left = _uniform_groups(r, credit, allowed_group_counts(model))
    return RemovalPlan(ffn_items + group_items, "uniform"), {"ffn_units": ffn_left, "attention_parameters": credit_left}


def _whole_groups_anywhere(r: _Round, credit: float) -> tuple[list[Removal], float]:
    """Whole KV groups, lowest group importance first in any block, while the credit covers them (never a block's last)."""
    left = {b: len(r.groups(b)) for b in r.blocks}
    candidates = sorted((imp, b, g) for b in r.blocks for imp, g in r.ranked_groups(b))
    items = []
    for importance, block, group in candidates:
        cost = r.group_cost(block, group)
        if cost > credit:
            break
        if left[block] > 1:
            items.append(Removal(r.group_units(block, group), importance))
            credit -= cost
            left[block] -= 1
    return items, float(credit)


def _uniform_ffn(r: _Round, units: float) -> tuple[list[Removal], float]:
    """⌊units / L⌋ FFN units in every layer (each layer's lowest v), one removal per slice; the rest carried."""
    names = [couple_name(b, "ffn") for b in r.blocks]
    per_layer = min(int(units // len(names)), min(r.by_name[n].units for n in names) - 1)
    orders = {n: torch.sort(r.v(n), stable=True).indices.tolist() for n in names} if per_layer > 0 else {}
    items = [r.removal({n: (orders[n][k],) for n in names}) for k in range(per_layer)]
    return items, float(units - per_layer * len(names))


def _uniform_groups(r: _Round, credit: float, allowed: Iterable[int]) -> tuple[list[Removal], float]:
    """Steps of whole KV groups while the credit covers one: from the layers' group count to the next
    ``allowed`` smaller count, each layer losing its next least important groups (one removal per step)."""
    counts = {len(r.groups(b)) for b in r.blocks}
    if len(counts) != 1:  # layers already differ: not a uniform model, no group step keeps it one
        return [], float(credit)
    (count,) = counts
    ranked = {b: [g for _, g in r.ranked_groups(b)] for b in r.blocks}
    scored = min(len(gs) for gs in ranked.values())  # only scored groups can go
    items, gone = [], 0
    for target in sorted((n for n in set(allowed) if 1 <= n < count), reverse=True):
        if count - target > scored:
            break
        step = {b: ranked[b][gone:count - target] for b in r.blocks}
        cost = sum(r.group_cost(b, g) for b, gs in step.items() for g in gs)
        if cost > credit:
            break
        units: dict[str, tuple[int, ...]] = {}
        for b, gs in step.items():
            for g in gs:
                units.update(r.group_units(b, g))
        mass = sum(r.group_importance(b, g) for b, gs in step.items() for g in gs)
        # never before the previous step (a later step alone would leave a count the config refuses)
        items.append(Removal(units, max(mass, items[-1].priority) if items else mass, chain="kv-groups"))
        credit -= cost
        gone = count - target
    return items, float(credit)
