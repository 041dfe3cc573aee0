"""Activation-aware unit scores: how much each couple unit actually contributes on the data.

The coupled L1 product ``‖W₁ row‖₁ · ‖W₂ column‖₁`` bounds a unit's contribution by its
weights alone. On a pretrained model that bound misleads: a few FFN neurons with small
weights but large activations carry the model, and removing the θ rule's "10% of the
mass" by weight can multiply perplexity (``benchmarks/transpa_damage.py``). The
activation score replaces the producing side's weight norm by the measured root mean
square of the unit's activation over the round's training batches:

- FFN and VO (a linear consumes the unit): ``v_u = Σ_c ‖W₂[:, c]‖₂ · √E[x_c²]`` over the
  unit's columns c of the consuming matrix (down; O for every query head of the group),
  the RMS size of what the unit adds to the block's output.
- QK (the unit is consumed by the attention dot product): ``v_u = Σ_h √E‖q_{h,u}‖² ·
  √E‖k_u‖²`` over the group's query heads h, with q and k the projections' outputs (a
  rotary pair's energy does not change under the rotation, so it is read before it).

``ActivationStats`` collects the second moments with forward hooks (training forwards
only: evaluation passes are not the training distribution of the round) and is part of
the TranSpa callback's checkpointed state, so a resumed round scores as an uninterrupted one.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..models import get_weight
from .couples import Couple, build_couples
from .importance import normalised

INPUT, OUTPUT = "in", "out"


def _consumes(couple: Couple) -> bool:
    return any(m.dim == 1 for m in couple.members)


def _needed(couples: list[Couple]) -> dict[str, set[str]]:
    """layer -> which second moments the scores need: its inputs (a consumer's columns) or outputs (QK rows)."""
    need: dict[str, set[str]] = {}
    for c in couples:
        for m in c.members:
            if m.dim == 1:
                need.setdefault(m.layer, set()).add(INPUT)
            elif not _consumes(c):
                need.setdefault(m.layer, set()).add(OUTPUT)
    return need


class ActivationStats:
    """Per-feature Σx² and row counts of the couples' layers' inputs / outputs, over forward passes.

    ``attach(model)`` hooks the layers the couples use now; call ``detach()`` before the model's shapes
    change and ``reset()`` + ``attach`` after. ``training_only`` skips forwards in eval mode.
    """

    def __init__(self, training_only: bool = True):
        self.training_only = training_only
        self.sums: dict[str, torch.Tensor] = {}  # "layer|in" / "layer|out" -> float64 (features,)
        self.rows: dict[str, int] = {}
        self._handles: list = []

    def reset(self) -> None:
        self.sums, self.rows = {}, {}

    def attach(self, model: nn.Module) -> None:
        self.detach()
        for layer, kinds in _needed(build_couples(model)).items():
            module = model.get_submodule(layer)
            self._handles.append(module.register_forward_hook(self._hook(layer, sorted(kinds))))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, layer: str, kinds: list[str]):
        @torch.no_grad()
        def hook(module, args, output):
            if self.training_only and not module.training:
                return
            for kind in kinds:
                x = args[0] if kind == INPUT else output
                x = x.detach().reshape(-1, x.shape[-1])
                key = f"{layer}|{kind}"
                total = x.float().pow(2).sum(0).double().cpu()
                self.sums[key] = self.sums[key] + total if key in self.sums else total
                self.rows[key] = self.rows.get(key, 0) + x.shape[0]
        return hook

    def mean_square(self, layer: str, kind: str) -> torch.Tensor:
        key = f"{layer}|{kind}"
        if not self.rows.get(key):
            raise ConfigError(f"no activations of {layer} were recorded: attach the statistics before the round's "
                              "training forwards")
        return self.sums[key] / self.rows[key]

    def unit_scores(self, model: nn.Module, couple: Couple) -> torch.Tensor:
        """Activation score of each unit of ``couple`` (float64, sums to 1; uniform if all are 0)."""
        if _consumes(couple):
            v = torch.zeros(couple.units, dtype=torch.float64)
            for m in couple.members:
                if m.dim != 1:
                    continue
                module = model.get_submodule(m.layer)
                columns = get_weight(module).detach().double().norm(dim=0)  # out x in: a column per input feature
                v += (columns * self.mean_square(m.layer, INPUT).sqrt())[m.index].sum(1)
        else:
            producer, partner = sorted(couple.members, key=lambda m: m.side)
            k = partner.index.shape[1]  # rows of one head's unit (2 for a rotary pair)
            q = self.mean_square(producer.layer, OUTPUT)[producer.index]  # units x (heads * k)
            q = q.reshape(couple.units, -1, k).sum(2).sqrt().sum(1)
            kk = self.mean_square(partner.layer, OUTPUT)[partner.index].sum(1).sqrt()
            v = q * kk
        return normalised(v)

    def state_dict(self) -> dict:
        return {"sums": {k: v.clone() for k, v in self.sums.items()}, "rows": dict(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        self.sums = {str(k): torch.as_tensor(v, dtype=torch.float64) for k, v in state.get("sums", {}).items()}
        self.rows = {str(k): int(v) for k, v in state.get("rows", {}).items()}
