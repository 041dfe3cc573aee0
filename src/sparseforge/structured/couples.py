"""Couples: sets of weight matrices that share one inner dimension (TranSpa §3.1).

A couple's inner *unit* is what coupled sparsification removes at once; each of the
couple's matrices (a ``Member``) holds, per unit, ``k`` rows (``dim`` 0: outputs) or
columns (``dim`` 1: inputs) of its weight in out x in layout (GPT-2's Conv1D included).
``side`` 0/1 says which factor of the coupled product the member is (W₁ or W₂ of
``W_couple = W₁ W₂``): the coupled L1 score multiplies the two sides.

Per block (``build_couples`` reads the CURRENT shapes, so call it again after a shrink):

- FFN (one couple): unit j = intermediate neuron j. Gated (SwiGLU): gate row j and up
  row j (side 0), down column j (side 1). ReLU/GELU: up row j (+ its bias), down column j.
- QK, one per KV group g: units are the inner dims the group's query heads share with key
  head g. With rotary embeddings a unit is a rotary PAIR (p, p + head_dim / 2): removed
  together, so a kept pair keeps its frequency. Members: the q rows of every query head
  of the group (side 0, ``k`` = 2 x group_size) and the k rows of head g (side 1).
- VO, one per KV group g: unit j = value dim j: v row (g, j) (side 0) and the o columns
  (h, j) of every query head h of the group (side 1).

GPT-2's fused ``c_attn`` (q | k | v stacked along the outputs) gives members that index
into the fused matrix with offsets. A couple with no units left (a group whose QK dims
are all gone) is not listed. Removing every unit of a group's QK and VO couples removes
the group and its query heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ModelError
from ..models import AttentionSpec, get_adapter, get_weight
from .attention import AttentionLayout, CompactAttention

KINDS = ("qk", "vo", "ffn")


@dataclass(frozen=True)
class Member:
    """One matrix of a couple: ``index[u]`` are the k rows (dim 0) or columns (dim 1) unit u occupies."""

    layer: str  # full module name
    dim: int  # 0: rows / outputs, 1: columns / inputs (out x in layout)
    side: int  # 0 or 1: the factor of the coupled product
    index: torch.Tensor = field(repr=False)  # LongTensor (units, k)


@dataclass(frozen=True)
class Couple:
    name: str
    kind: str  # "qk", "vo" or "ffn"
    block: int
    group: int | None  # the KV group (attention couples)
    members: tuple[Member, ...]

    @property
    def units(self) -> int:
        return int(self.members[0].index.shape[0])

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(m.layer for m in self.members))


@dataclass(frozen=True)
class BlockAttention:
    """Where one block's attention is and its current layout."""

    block: int
    core: str  # full name of the module holding q/k/v (replaced by CompactAttention in the free layout)
    layout: AttentionLayout
    q: str  # full layer names; q, k and v are the same layer when fused
    k: str
    v: str
    o: str
    fused: bool
    compact: bool  # the core is a CompactAttention

    @property
    def offsets(self) -> tuple[int, int, int]:
        """Row offsets of q, k and v inside their layers (non-zero only in a fused projection)."""
        if not self.fused:
            return 0, 0, 0
        return 0, self.layout.q_size, self.layout.q_size + self.layout.k_size


def couple_name(prefix: str, kind: str, group: int | None = None) -> str:
    return f"{prefix}:{kind}" if group is None else f"{prefix}:{kind}.{group}"


def _rows(module: nn.Module) -> int:
    return int(get_weight(module).shape[0])


def _core_name(spec: AttentionSpec) -> str:
    return (spec.q or spec.qkv).rpartition(".")[0]


def block_attention(model: nn.Module, index: int, adapter=None) -> BlockAttention:
    """The attention of block ``index`` as it is now (stock modules: whole heads of the config's head size)."""
    adapter = adapter or get_adapter(model)
    spec = adapter.attention()
    prefix = adapter.block_prefix(index)
    block = adapter.blocks[index]
    core_rel = _core_name(spec)
    core = block.get_submodule(core_rel) if core_rel else block
    fused = spec.qkv is not None

    def full(rel):
        return f"{prefix}.{rel}"

    q, k, v = (full(spec.qkv),) * 3 if fused else (full(spec.q), full(spec.k), full(spec.v))
    core_name = full(core_rel) if core_rel else prefix
    if isinstance(core, CompactAttention):
        return BlockAttention(index, core_name, core.layout, q, k, v, full(spec.o), fused, True)
    hd = spec.head_dim
    if fused:
        if spec.num_kv_heads != spec.num_heads:
            raise ModelError("a fused q/k/v projection with grouped-query attention is not supported: describe q, k, v apart")
        rows = _rows(block.get_submodule(spec.qkv))
        if rows % (3 * hd):
            raise ModelError(f"fused projection {q} has {rows} outputs, not 3 x heads x {hd}: its shapes are not whole heads")
        groups = rows // (3 * hd)
    else:
        k_rows, q_rows = _rows(block.get_submodule(spec.k)), _rows(block.get_submodule(spec.q))
        groups = k_rows // hd
        if k_rows % hd or q_rows != groups * spec.group_size * hd:
            raise ModelError(f"attention of block {index} has q {q_rows} / k {k_rows} outputs: not whole heads of {hd} "
                             f"with {spec.group_size} query heads per KV head")
    layout = AttentionLayout.full(hd, spec.group_size, groups, spec.rope)
    return BlockAttention(index, core_name, layout, q, k, v, full(spec.o), fused, False)


def attention_couples(att: BlockAttention, prefix: str) -> list[Couple]:
    lay = att.layout
    q_off, k_off, v_off = att.offsets
    couples = []
    for g in range(lay.num_groups):
        if lay.qk_units(g):
            pos = lay.qk_positions(g)
            q_index = torch.cat([q_off + lay.q_offset(g, h) + pos for h in range(lay.group_size)], 1)
            k_index = k_off + lay.k_offset(g) + pos
            couples.append(Couple(couple_name(prefix, "qk", g), "qk", att.block, g,
                                  (Member(att.q, 0, 0, q_index), Member(att.k, 0, 1, k_index))))
        units = torch.arange(lay.v_dim(g))[:, None]
        o_index = torch.cat([lay.o_offset(g, h) + units for h in range(lay.group_size)], 1)
        couples.append(Couple(couple_name(prefix, "vo", g), "vo", att.block, g,
                              (Member(att.v, 0, 0, v_off + lay.v_offset(g) + units), Member(att.o, 1, 1, o_index))))
    return couples


def ffn_couple(model: nn.Module, index: int, adapter=None) -> Couple:
    adapter = adapter or get_adapter(model)
    spec, prefix = adapter.ffn, adapter.block_prefix(index)
    block = adapter.blocks[index]
    units = torch.arange(_rows(block.get_submodule(spec.up)))[:, None]
    members = [Member(f"{prefix}.{name}", 0, 0, units) for name in (spec.gate, spec.up) if name]
    members.append(Member(f"{prefix}.{spec.down}", 1, 1, units))
    return Couple(couple_name(prefix, "ffn"), "ffn", index, None, tuple(members))


def build_couples(model: nn.Module) -> list[Couple]:
    """Every couple of the model, block by block (QK/VO per KV group, then the FFN), from the current shapes."""
    adapter = get_adapter(model)
    couples = []
    for i in range(len(adapter.blocks)):
        couples += attention_couples(block_attention(model, i, adapter), adapter.block_prefix(i))
        couples.append(ffn_couple(model, i, adapter))
    return couples


def unit_cost(model: nn.Module, couple: Couple) -> int:
    """Parameters one unit of ``couple`` holds (weights + the bias entries of removed rows); equal for every unit."""
    total = 0
    for m in couple.members:
        module = model.get_submodule(m.layer)
        weight = get_weight(module)
        k = m.index.shape[1]
        total += k * weight.shape[1 - m.dim]
        if m.dim == 0 and getattr(module, "bias", None) is not None:
            total += k
    return total


def compact_capable(model: nn.Module, adapter=None) -> bool:
    """True if the model's attention can run per-group sizes (CompactAttention): its attention
    module holds no parameters besides the projections (no per-head q/k norms)."""
    from .attention import has_only_projections

    adapter = adapter or get_adapter(model)
    spec = adapter.attention()
    core_rel = _core_name(spec)
    block = adapter.blocks[0]
    core = block.get_submodule(core_rel) if core_rel else block
    if isinstance(core, CompactAttention):
        return True
    names = [spec.qkv] if spec.qkv else [spec.q, spec.k, spec.v]
    names += [spec.o] if spec.o.rpartition(".")[0] == core_rel else []
    return has_only_projections(core, {name.rpartition(".")[2] for name in names})
