"""Applying a removal plan: shrink the layers, the attention modules and the optimizer state.

``apply_plan(model, plan, optimizer)`` removes, for every planned unit, the rows (and
their bias entries) and columns its couple's members index. Parameters shrink IN PLACE
(``param.data`` is replaced by the kept slice), so every Parameter object stays the
one the optimizer, accelerate and hooks hold; the layer's ``in_features`` /
``out_features`` (Conv1D's ``nf`` / ``nx``) follow. Optimizer surgery (torch Adam /
AdamW, or accelerate's wrapper of one): every state tensor shaped like the parameter
(``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) loses exactly the removed slices;
``step`` and the param groups stay. A ``.grad`` present is shrunk too.

Attention, per block whose attention changed:
- ``uniform`` layout: whole KV groups only, stock modules; their head-count attributes
  (``HEAD_COUNT_ATTRS``: OPT's ``num_heads``, GPT-2's ``split_size``...) are updated
  (head size and the query/KV ratio unchanged). ``uniform_config`` gives the config
  changes for ``save_pretrained``.
- ``free`` layout: the attention module becomes a ``CompactAttention`` (per-group QK
  pairs and V dims; whole-group removal too, so the manifest can rebuild it) holding the
  same, shrunk, projection modules. Models whose attention cannot be compacted (per-head
  q/k norms) take whole groups only, on stock modules.

A shrunk GPT-2 Conv1D becomes a ``StructuredConv1D`` (same object, a subclass with a
manifest entry). Not for DDP/FSDP-wrapped models (their buckets and shards hold shapes).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import ConfigError, ModelError
from ..models import get_adapter
from .attention import OUT_DROPOUT_ATTRS, PROB_DROPOUT_ATTRS, AttentionLayout, CompactAttention, GroupLayout, dropout_of
from .couples import BlockAttention, block_attention, build_couples, compact_capable, couple_name, ffn_couple, unit_cost
from .plain_config import allowed_group_counts, config_keys
from .select import RemovalPlan, check_layout, normalize_units

#: attributes HF attention modules keep their head counts in: name -> what it holds
HEAD_COUNT_ATTRS = {"num_heads": "heads", "num_attention_heads": "heads", "num_key_value_heads": "groups",
                    "all_head_size": "width", "split_size": "width"}

class StructuredConv1D(Conv1D):
    """GPT-2's Conv1D with a manifest entry: a shrunk Conv1D cannot be rebuilt from the config."""

    def structure(self) -> dict:
        return {"class": "Conv1D", "nf": int(self.nf), "nx": int(self.nx)}

    @classmethod
    def from_structure(cls, structure: dict, dtype: torch.dtype | None = None) -> StructuredConv1D:
        try:
            module = cls(int(structure["nf"]), int(structure["nx"]))
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"Conv1D structure {structure!r} needs integer nf and nx: the sparseforge.json is damaged") from None
        return module.to(dtype) if dtype is not None else module


@dataclass
class SurgeryReport:
    removed_parameters: int = 0
    layers: list[str] = field(default_factory=list)  # layers whose shapes changed
    attention: list[str] = field(default_factory=list)  # attention modules replaced or updated


def _inner_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer) if optimizer is not None else None


@torch.no_grad()
def shrink_parameter(param: nn.Parameter, dim: int, keep: torch.Tensor, optimizer=None) -> None:
    """Keep only ``keep`` along ``dim`` of ``param`` (in place) and of its optimizer state tensors."""
    opt = _inner_optimizer(optimizer)
    keep = keep.to(param.device)
    state = opt.state.get(param) if opt is not None else None
    if state:
        for key, value in list(state.items()):
            if torch.is_tensor(value) and value.shape == param.shape:
                state[key] = value.index_select(dim, keep.to(value.device)).contiguous()
    param.data = param.data.index_select(dim, keep).contiguous()
    if param.grad is not None:
        param.grad = param.grad.index_select(dim, keep).contiguous()


def shrink_layer(module: nn.Module, dim: int, keep: torch.Tensor, optimizer=None) -> None:
    """Keep rows (dim 0, with their bias entries) or columns (dim 1) ``keep`` of a Linear / Conv1D (out x in dims)."""
    conv = isinstance(module, Conv1D)
    if not conv and not isinstance(module, nn.Linear):
        raise ModelError(f"cannot shrink a {type(module).__name__}: structured removal needs Linear or Conv1D layers")
    shrink_parameter(module.weight, (1 - dim) if conv else dim, keep, optimizer)
    if dim == 0 and module.bias is not None:
        shrink_parameter(module.bias, 0, keep, optimizer)
    if conv:
        module.nx, module.nf = module.weight.shape
        if type(module) is Conv1D:
            module.__class__ = StructuredConv1D  # adds structure(); the object, its parameters and hooks stay
    else:
        module.out_features, module.in_features = module.weight.shape


def _new_layouts(model, adapter, by_name, units) -> dict[int, tuple[BlockAttention, AttentionLayout]]:
    out = {}
    for i in range(len(adapter.blocks)):
        att = block_attention(model, i, adapter)
        prefix = adapter.block_prefix(i)
        groups, changed = [], False
        for g, group in enumerate(att.layout.groups):
            qk_rm = set(units.get(couple_name(prefix, "qk", g), ()))
            v_rm = set(units.get(couple_name(prefix, "vo", g), ()))
            changed |= bool(qk_rm or v_rm)
            if len(v_rm) == len(group.v):
                continue  # the group goes (normalize_units removed its QK units too)
            groups.append(GroupLayout(tuple(p for u, p in enumerate(group.qk) if u not in qk_rm),
                                      tuple(j for u, j in enumerate(group.v) if u not in v_rm)))
        if changed:
            if not groups:
                raise ConfigError(f"the plan removes every KV group of block {i}: keep at least one group in every layer")
            out[i] = (att, replace(att.layout, groups=tuple(groups)))
    return out


def _compact_from(model, adapter, att: BlockAttention, layout: AttentionLayout) -> CompactAttention:
    core = model.get_submodule(att.core)
    if isinstance(core, CompactAttention):
        projections = {role: core.projection(role) for role in core.roles}
        return CompactAttention(layout, projections, core.names, scaling=core.scaling, dropout=core.dropout,
                                out_dropout=core.out_dropout, is_causal=core.is_causal, layer_idx=core.layer_idx)
    scaling = getattr(core, "scaling", None)
    if scaling is None:
        raise ModelError(f"{type(core).__name__} keeps no 'scaling': compact attention cannot know its score scale")
    roles = {"qkv": att.q} if att.fused else {"q": att.q, "k": att.k, "v": att.v}
    if att.o.rpartition(".")[0] == att.core:
        roles["o"] = att.o
    projections = {role: model.get_submodule(name) for role, name in roles.items()}
    names = {role: name.rpartition(".")[2] for role, name in roles.items()}
    layer_idx = getattr(core, "layer_idx", None)
    return CompactAttention(layout, projections, names, scaling=float(scaling), dropout=dropout_of(core, PROB_DROPOUT_ATTRS),
                            out_dropout=dropout_of(core, OUT_DROPOUT_ATTRS), is_causal=getattr(core, "is_causal", adapter.causal),
                            layer_idx=att.block if layer_idx is None else layer_idx)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    try:
        from ..models.modules import replace_module
    except ImportError:  # pragma: no cover - the registry module predates this code in the repo
        parent, _, child = name.rpartition(".")
        module.train(model.get_submodule(name).training)
        setattr(model.get_submodule(parent) if parent else model, child, module)
        return
    replace_module(model, name, module)


def _update_head_counts(core: nn.Module, layout: AttentionLayout) -> None:
    values = {"heads": layout.num_heads, "groups": layout.num_groups, "width": layout.num_heads * layout.head_dim}
    for attr, what in HEAD_COUNT_ATTRS.items():
        if isinstance(getattr(core, attr, None), int) and not isinstance(getattr(core, attr), bool):
            setattr(core, attr, values[what])


def apply_plan(model: nn.Module, plan: RemovalPlan | Mapping[str, Iterable[int]], optimizer=None,
               layout: str | None = None) -> SurgeryReport:
    """Physically remove the plan's units from ``model`` (and ``optimizer``'s state); see the module docstring."""
    if not isinstance(plan, RemovalPlan):
        plan = RemovalPlan.from_units(plan, layout or "free")
    layout = check_layout(layout or plan.layout)
    adapter = get_adapter(model)
    couples = build_couples(model)
    by_name = {c.name: c for c in couples}
    units = normalize_units(couples, plan.units())
    report = SurgeryReport(removed_parameters=sum(len(us) * unit_cost(model, by_name[n]) for n, us in units.items()))
    if not units:
        return report
    layouts = _new_layouts(model, adapter, by_name, units)
    capable = compact_capable(model, adapter)
    for i, (att, new) in layouts.items():
        if att.compact and layout == "uniform":
            raise ConfigError(f"block {i} already runs compact attention (free layout): continue with layout free")
        if (layout == "uniform" or not capable) and not new.is_full:
            why = "the uniform layout keeps whole heads" if layout == "uniform" else \
                f"{type(model.get_submodule(att.core)).__name__} cannot run per-group sizes"
            raise ConfigError(f"the plan removes part of a KV group in block {i} but {why}: remove whole groups "
                              "(every unit of its QK and VO couples), as plan_round does")
    removed: dict[tuple[str, int], set[int]] = {}
    for name, us in units.items():
        for m in by_name[name].members:
            removed.setdefault((m.layer, m.dim), set()).update(m.index[us].flatten().tolist())
    if layout == "uniform":
        _check_uniform(model, adapter, layouts, removed)
    for (layer, dim), rows in removed.items():
        module = model.get_submodule(layer)
        size = module.weight.shape[(1 - dim) if isinstance(module, Conv1D) else dim]
        keep = torch.tensor([j for j in range(size) if j not in rows], dtype=torch.long)
        shrink_layer(module, dim, keep, optimizer)
        report.layers.append(layer)
    for att, new in layouts.values():
        if layout == "free" and capable:
            _replace(model, att.core, _compact_from(model, adapter, att, new))
        else:
            _update_head_counts(model.get_submodule(att.core), new)
        report.attention.append(att.core)
    return report


def _check_uniform(model, adapter, layouts, removed) -> None:
    groups, widths = set(), set()
    for i in range(len(adapter.blocks)):
        groups.add(layouts[i][1].num_groups if i in layouts else block_attention(model, i, adapter).layout.num_groups)
        couple = ffn_couple(model, i, adapter)
        down = couple.members[-1]
        widths.add(couple.units - len(removed.get((down.layer, down.dim), ())))
    if len(groups) > 1 or len(widths) > 1:
        raise ConfigError(f"the plan leaves layers with different sizes (KV groups {sorted(groups)}, FFN widths {sorted(widths)}) "
                          "but the layout is uniform: remove the same number of units in every layer, or use layout free")


def uniform_config(model: nn.Module) -> dict:
    """The config changes that make ``from_pretrained`` rebuild this (uniform-layout) model as a plain HF model."""
    adapter = get_adapter(model)
    keys = config_keys(adapter)
    if keys is None:
        raise ConfigError(f"no uniform-layout config keys for {type(adapter).__name__}: save with the structure manifest")
    spec = adapter.attention()
    atts = [block_attention(model, i, adapter) for i in range(len(adapter.blocks))]
    if any(a.compact or not a.layout.is_full for a in atts):
        raise ConfigError("the model has per-group attention sizes (free layout): save it with the structure manifest")
    groups = {a.layout.num_groups for a in atts}
    widths = {ffn_couple(model, i, adapter).units for i in range(len(adapter.blocks))}
    if len(groups) > 1 or len(widths) > 1:
        raise ConfigError(f"layers differ (KV groups {sorted(groups)}, FFN widths {sorted(widths)}): a plain HF config "
                          "needs one size for all; save with the structure manifest")
    (num_groups,), (width,) = groups, widths
    heads = num_groups * spec.group_size
    changes = {keys["ffn"]: width}
    if keys["head_dim"] is None:
        if heads != spec.num_heads:
            raise ConfigError(f"{type(adapter).__name__.removesuffix('Adapter')} derives its head size from hidden_size / heads: "
                              "a model with removed heads cannot be a plain checkpoint; save with the structure manifest")
        return changes
    allowed = allowed_group_counts(model)
    if num_groups not in allowed:
        raise ConfigError(f"a plain {type(model.config).__name__} refuses {num_groups} KV groups ({heads} heads of "
                          f"{spec.head_dim}); it accepts {', '.join(map(str, allowed))}: remove groups with plan_round's "
                          "uniform rule, or save with the structure manifest (layout free)")
    changes.update({keys["heads"]: heads, keys["kv_heads"]: num_groups, keys["head_dim"]: spec.head_dim})
    return changes


def manifest_includes(model: nn.Module) -> list[str]:
    """Full names of the block linears ``structure_manifest`` must record via ``include``: the plain
    ``nn.Linear`` layers of the FFNs and stock attention (children of a module with structure() are
    rebuilt by it; StructuredConv1D records itself)."""
    adapter = get_adapter(model)
    names = []
    for i, block in enumerate(adapter.blocks):
        prefix = adapter.block_prefix(i)
        for rel in adapter.linear_names:
            module = block.get_submodule(rel)
            parts = rel.split(".")
            parents = (block.get_submodule(".".join(parts[:j])) for j in range(1, len(parts)))
            if type(module) is nn.Linear and not any(callable(getattr(p, "structure", None)) for p in parents):
                names.append(f"{prefix}.{rel}")
    return names


def _register() -> None:
    try:
        from ..models.modules import register_structure_class
    except ImportError:
        return
    register_structure_class("Conv1D", "sparseforge.structured.surgery:StructuredConv1D")


_register()
