"""Structured sparsity that makes models physically smaller (TranSpa's structural core).

Scoring and applying stay apart:
- ``couples``: which matrices share an inner dimension and which rows / columns a unit is;
- ``importance``: coupled Fisher over a round, coupled L1 unit scores, ablation scores;
- ``select``: top-K couples, the θ rule, free / uniform layouts, budgets (a ``RemovalPlan``);
- ``surgery``: shrink layers, attention modules and the optimizer state; uniform-layout config;
- ``attention``: ``CompactAttention``, attention with per-KV-group sizes (free layout).

A round: ``fisher.accumulate(model)`` after each backward; then ``plan, carry =
plan_round(model, fisher.scores(), layout=..., carry=carry)``, ``plan = clamp_plan(model,
plan, current - target)``, ``apply_plan(model, plan, optimizer)``, ``fisher.reset()``.
"""

from __future__ import annotations

from .attention import AttentionLayout, CompactAttention, GroupLayout
from .couples import BlockAttention, Couple, Member, block_attention, build_couples, compact_capable, unit_cost
from .importance import CoupledFisher, magnitude_scores, structured_l1_scores, tsvd, unit_scores
from .plain_config import allowed_group_counts
from .select import (
    LAYOUTS,
    Removal,
    RemovalPlan,
    clamp_plan,
    finest_removal,
    layout_floor,
    normalize_units,
    plan_parameters,
    plan_round,
    select_couples,
    theta_rule,
)
from .surgery import StructuredConv1D, SurgeryReport, apply_plan, manifest_includes, shrink_layer, shrink_parameter, uniform_config

__all__ = [
    "LAYOUTS",
    "AttentionLayout",
    "BlockAttention",
    "CompactAttention",
    "CoupledFisher",
    "Couple",
    "GroupLayout",
    "Member",
    "Removal",
    "RemovalPlan",
    "StructuredConv1D",
    "SurgeryReport",
    "allowed_group_counts",
    "apply_plan",
    "block_attention",
    "build_couples",
    "clamp_plan",
    "compact_capable",
    "finest_removal",
    "layout_floor",
    "magnitude_scores",
    "manifest_includes",
    "normalize_units",
    "plan_parameters",
    "plan_round",
    "select_couples",
    "shrink_layer",
    "shrink_parameter",
    "structured_l1_scores",
    "theta_rule",
    "tsvd",
    "uniform_config",
    "unit_cost",
    "unit_scores",
]
