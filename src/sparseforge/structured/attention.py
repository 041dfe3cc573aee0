"""Attention whose KV groups have their own query/key and value sizes (TranSpa's free layout).

Stock Hugging Face attention needs one head size for every head of a layer. Coupled
sparsification removes inner dimensions per KV group: the rotary *pairs* a group's query
and key heads share (QK couple) and the value dimensions its value head and the matching
output-projection columns share (VO couple). ``CompactAttention`` runs such a layer:

- the projections are physically smaller: q (Σ_g group_size·qk_g rows), k (Σ_g qk_g),
  v (Σ_g v_g), o (Σ_g group_size·v_g columns), in the order group, query head, dim;
  inside a head the qk dims keep the rotate-half order (first halves of the kept pairs,
  then their second halves), so a kept pair keeps its own rotary frequency: the cos/sin
  of its original dimension are indexed, never recomputed;
- the score scale stays the original 1/√head_dim (the module's own ``scaling``);
- consecutive groups of equal sizes run as one ``scaled_dot_product_attention`` call on
  views of the packed projections (no padding, no copies: a uniform layout is one call,
  like stock attention), with the mask the model passes (boolean, additive, or None =
  causal for a decoder / full for an encoder);
- a group with no qk dims left has scores 0: uniform attention over the allowed
  positions, exactly what the masked model computes;
- the KV cache holds the compact keys and values of all groups packed as
  (batch, 1, seq, Σ dims): a cache only concatenates along the sequence.

One class serves every family: separate q/k/v (LLaMA, Mistral, Qwen2, OPT, BERT's
``attention.self`` with the output projection outside it) or GPT-2's fused Conv1D
``c_attn``; with or without rotary embeddings. It keeps the child names of the module it
replaces (``q_proj``/``query``/``c_attn``...), so adapters still find the linears.
It does not record attention weights (``output_attentions``) and needs an attention
module with no parameters besides its projections (Qwen3's per-head q/k norms are not
supported: such models shrink by whole KV groups only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import ConfigError, ModelError
from ..models.base import is_reparametrised

#: attribute names under which HF attention modules keep their attention-probability dropout
PROB_DROPOUT_ATTRS = ("attention_dropout", "attn_dropout", "dropout")
#: ... and a dropout applied after the output projection (GPT-2)
OUT_DROPOUT_ATTRS = ("resid_dropout",)


@dataclass(frozen=True)
class GroupLayout:
    """One KV group: the inner dims its QK and VO couples still have, as ORIGINAL indices.

    With rotary embeddings ``qk`` lists kept pair indices p (0 <= p < head_dim / 2; the pair
    is dims p and p + head_dim / 2), else kept q/k dims. ``v`` lists kept value dims.
    """

    qk: tuple[int, ...]
    v: tuple[int, ...]


@dataclass(frozen=True)
class AttentionLayout:
    """The current inner sizes of one layer's attention, group by group."""

    head_dim: int  # the original head size (rotary frequencies and the score scale come from it)
    group_size: int  # query heads per KV group
    rope: bool
    groups: tuple[GroupLayout, ...]

    @classmethod
    def full(cls, head_dim: int, group_size: int, num_groups: int, rope: bool) -> AttentionLayout:
        qk = tuple(range(head_dim // 2 if rope else head_dim))
        return cls(head_dim, group_size, rope, tuple(GroupLayout(qk, tuple(range(head_dim))) for _ in range(num_groups)))

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def num_heads(self) -> int:
        return self.group_size * self.num_groups

    def qk_units(self, g: int) -> int:
        return len(self.groups[g].qk)

    def qk_dim(self, g: int) -> int:
        return len(self.groups[g].qk) * (2 if self.rope else 1)

    def v_dim(self, g: int) -> int:
        return len(self.groups[g].v)

    @property
    def is_full(self) -> bool:
        """Every group has its whole head (stock attention can run it)."""
        return all(self.qk_dim(g) == self.head_dim and self.v_dim(g) == self.head_dim for g in range(self.num_groups))

    # sizes and offsets of the packed projections
    @property
    def q_size(self) -> int:
        return self.group_size * sum(self.qk_dim(g) for g in range(self.num_groups))

    @property
    def k_size(self) -> int:
        return sum(self.qk_dim(g) for g in range(self.num_groups))

    @property
    def v_size(self) -> int:
        return sum(self.v_dim(g) for g in range(self.num_groups))

    @property
    def o_size(self) -> int:
        return self.group_size * self.v_size

    def q_offset(self, g: int, head: int = 0) -> int:
        return self.group_size * sum(self.qk_dim(j) for j in range(g)) + head * self.qk_dim(g)

    def k_offset(self, g: int) -> int:
        return sum(self.qk_dim(j) for j in range(g))

    def v_offset(self, g: int) -> int:
        return sum(self.v_dim(j) for j in range(g))

    def o_offset(self, g: int, head: int = 0) -> int:
        return self.group_size * self.v_offset(g) + head * self.v_dim(g)

    def qk_positions(self, g: int) -> torch.Tensor:
        """(units, 1 or 2): the positions inside one head's qk block that unit u occupies."""
        units = torch.arange(self.qk_units(g))
        return torch.stack([units, units + len(units)], 1) if self.rope else units[:, None]

    def qk_original_dims(self, g: int) -> list[int]:
        """The original head dim of each position of a head's qk block (rotary frequency index)."""
        qk = list(self.groups[g].qk)
        return qk + [p + self.head_dim // 2 for p in qk] if self.rope else qk

    def to_dict(self) -> dict:
        return {"head_dim": self.head_dim, "group_size": self.group_size, "rope": self.rope,
                "groups": [{"qk": list(g.qk), "v": list(g.v)} for g in self.groups]}

    @classmethod
    def from_dict(cls, data: dict) -> AttentionLayout:
        try:
            groups = tuple(GroupLayout(tuple(int(i) for i in g["qk"]), tuple(int(i) for i in g["v"])) for g in data["groups"])
            return cls(int(data["head_dim"]), int(data["group_size"]), bool(data["rope"]), groups)
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"attention layout {data!r} is malformed: the sparseforge.json is damaged; save the model again") from None


def _projection(kind: str, in_features: int, out_features: int, bias: bool, dtype) -> nn.Module:
    if kind == "conv1d":
        module = Conv1D(out_features, in_features)
        if not bias:
            raise ModelError("a Conv1D projection always has a bias: the sparseforge.json is damaged; save the model again")
        return module.to(dtype) if dtype is not None else module
    return nn.Linear(in_features, out_features, bias=bias, dtype=dtype)


def _shape(module: nn.Module) -> tuple[str, int, int, bool]:
    """(kind, in, out, bias) of a Linear or Conv1D; a reparametrised linear (LoSparse's factors) is recorded
    as the Linear it stands in for: the manifest records it itself, rebuilt in place after this module."""
    if isinstance(module, Conv1D):
        return "conv1d", module.weight.shape[0], module.weight.shape[1], True
    if isinstance(module, nn.Linear) or (is_reparametrised(module) and callable(getattr(module, "structure", None))):
        return "linear", module.in_features, module.out_features, getattr(module, "bias", None) is not None
    raise ModelError(f"compact attention needs Linear or Conv1D projections, or factors with structure() "
                     f"(compact LoSparse), not {type(module).__name__}: finish the method (compact or dense export) "
                     "before saving")


@dataclass(frozen=True)
class _Run:
    """Consecutive KV groups with equal sizes: one attention call on views of the packed projections."""

    groups: int
    qk: int  # qk dims per head
    v: int  # value dims per head
    q: slice  # columns of the packed q / k / v
    k: slice
    v_cols: slice


def _runs(layout: AttentionLayout) -> list[_Run]:
    runs: list[_Run] = []
    for g in range(layout.num_groups):
        qk, v = layout.qk_dim(g), layout.v_dim(g)
        if runs and (runs[-1].qk, runs[-1].v) == (qk, v):
            last = runs[-1]
            runs[-1] = _Run(last.groups + 1, qk, v, slice(last.q.start, last.q.stop + layout.group_size * qk),
                            slice(last.k.start, last.k.stop + qk), slice(last.v_cols.start, last.v_cols.stop + v))
        else:
            q0, k0, v0 = layout.q_offset(g), layout.k_offset(g), layout.v_offset(g)
            runs.append(_Run(1, qk, v, slice(q0, q0 + layout.group_size * qk), slice(k0, k0 + qk), slice(v0, v0 + v)))
    return runs


_SDPA_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


class CompactAttention(nn.Module):
    """Attention with per-KV-group QK pair counts and value sizes; see the module docstring.

    ``projections``: role -> module, roles "q", "k", "v" (or "qkv" fused) and optionally "o";
    ``names``: role -> the child name to register it under (the replaced module's names).
    Returns ``(output, None)`` like the HF attention modules it replaces.
    """

    def __init__(self, layout: AttentionLayout, projections: dict[str, nn.Module], names: dict[str, str], *, scaling: float,
                 dropout: float = 0.0, out_dropout: float = 0.0, is_causal: bool = True, layer_idx: int | None = None):
        super().__init__()
        if layout.num_groups < 1:
            raise ConfigError("an attention layer needs at least one KV group: keep one group in every layer")
        if any(layout.v_dim(g) == 0 for g in range(layout.num_groups)):
            raise ConfigError("a KV group without value dims contributes nothing: remove the group instead")
        self.layout = layout
        self.names = dict(names)
        self.scaling = float(scaling)
        self.dropout = float(dropout)
        self.out_dropout = float(out_dropout)
        self.is_causal = bool(is_causal)
        self.layer_idx = layer_idx
        fused = "qkv" in projections
        expected = {"qkv": layout.q_size + layout.k_size + layout.v_size} if fused else \
            {"q": layout.q_size, "k": layout.k_size, "v": layout.v_size}
        for role, out in expected.items():
            got = _shape(projections[role])[2]
            if got != out:
                raise ModelError(f"compact attention: projection {role} has {got} outputs, the layout needs {out}")
        if "o" in projections and _shape(projections["o"])[1] != layout.o_size:
            raise ModelError(f"compact attention: the output projection has {_shape(projections['o'])[1]} inputs, "
                             f"the layout needs {layout.o_size}")
        self.roles = tuple(projections)
        for role, module in projections.items():
            self.add_module(self.names[role], module)
        self._build_indices()

    def projection(self, role: str) -> nn.Module | None:
        return getattr(self, self.names[role]) if role in self.roles else None

    def _build_indices(self) -> None:
        lay = self.layout
        g_of_head = [g for g in range(lay.num_groups) for _ in range(lay.group_size)]
        self.runs = _runs(lay)
        buffers = {}
        if lay.rope:
            # per packed column: its original dim (rotary frequency), its rotate-half partner column and sign
            def rope_tables(heads_of_groups):
                dims, partner, sign, start = [], [], [], 0
                for g in heads_of_groups:
                    original = lay.qk_original_dims(g)
                    half = len(original) // 2
                    dims.extend(original)
                    partner.extend([start + half + i for i in range(half)] + [start + i for i in range(half)])
                    sign.extend([-1.0] * half + [1.0] * half)
                    start += len(original)
                return torch.tensor(dims, dtype=torch.long), torch.tensor(partner, dtype=torch.long), torch.tensor(sign)

            buffers["q_dims"], buffers["q_partner"], buffers["q_sign"] = rope_tables(g_of_head)
            buffers["k_dims"], buffers["k_partner"], buffers["k_sign"] = rope_tables(range(lay.num_groups))
        # the projections' device, unless they are meta (a skeleton being loaded): then the tables stay real
        device = next((p.device for p in self.parameters() if not p.is_meta), None)
        for name, value in buffers.items():
            self.register_buffer(name, value.to(device) if device is not None else value, persistent=False)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dims, partner, sign) -> torch.Tensor:
        if x.shape[-1] == 0:
            return x
        cos, sin = cos.index_select(-1, dims), sin.index_select(-1, dims)
        return x * cos + (x.index_select(-1, partner) * sign.to(x.dtype)) * sin

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None, past_key_values=None, cache=None,
                **kwargs) -> tuple[torch.Tensor, None]:
        # transformers 5.25 renamed the layer's cache argument from past_key_values to cache: take either
        past_key_values = cache if cache is not None else past_key_values
        lay = self.layout
        batch, length = hidden_states.shape[:2]
        if "qkv" in self.roles:
            q, k, v = self.projection("qkv")(hidden_states).split([lay.q_size, lay.k_size, lay.v_size], dim=-1)
        else:
            q, k, v = (self.projection(role)(hidden_states) for role in ("q", "k", "v"))
        if lay.rope:
            if position_embeddings is None:
                raise ModelError("compact rotary attention needs the position_embeddings its decoder layer passes")
            cos, sin = position_embeddings
            q = self._rotate(q, cos, sin, self.q_dims, self.q_partner, self.q_sign)
            k = self._rotate(k, cos, sin, self.k_dims, self.k_partner, self.k_sign)
        keys, values = k.unsqueeze(1), v.unsqueeze(1)
        if lay.k_size == 0:  # a cache needs a non-empty key tensor to know its length
            keys = keys.new_zeros(batch, 1, length, 1)
        if past_key_values is not None:
            if self.layer_idx is None:
                raise ModelError("compact attention without a layer index cannot use a KV cache: rebuild it with layer_idx")
            keys, values = past_key_values.update(keys, values, self.layer_idx)
        total = keys.shape[-2]
        keys = keys[:, 0, :, : lay.k_size]
        values = values[:, 0]
        mask, causal = attention_mask, False
        if mask is None:
            if self.is_causal and length > 1:
                if total == length:
                    causal = True
                else:  # chunked prefill after a cache: causal aligned to the end
                    mask = (torch.arange(length, device=q.device)[:, None] + (total - length)
                            >= torch.arange(total, device=q.device)[None, :])
        elif mask.shape[-1] > total:
            mask = mask[..., :total]
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
        gs, dropout = lay.group_size, (self.dropout if self.training else 0.0)
        outs = []
        for run in self.runs:
            heads = run.groups * gs
            if run.qk:
                qs = q[..., run.q].view(batch, length, heads, run.qk).transpose(1, 2)
                ks = keys[..., run.k].view(batch, total, run.groups, run.qk).transpose(1, 2)
            else:  # no qk dims left: scores 0, uniform attention over the allowed positions
                qs = q.new_zeros(batch, heads, length, 1)
                ks = q.new_zeros(batch, run.groups, total, 1)
            vs = values[..., run.v_cols].view(batch, total, run.groups, run.v).transpose(1, 2)
            extra = {}
            if gs > 1:
                if _SDPA_GQA:
                    extra["enable_gqa"] = True
                else:
                    ks, vs = ks.repeat_interleave(gs, dim=1), vs.repeat_interleave(gs, dim=1)
            out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                                 scale=self.scaling, **extra)
            outs.append(out.transpose(1, 2).reshape(batch, length, heads * run.v))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, -1)
        if "o" in self.roles:
            out = self.projection("o")(out)
            if self.out_dropout and self.training:
                out = F.dropout(out, self.out_dropout, training=True)
        return out, None

    def extra_repr(self) -> str:
        lay = self.layout
        sizes = ", ".join(f"{lay.qk_dim(g)}/{lay.v_dim(g)}" for g in range(lay.num_groups))
        return f"groups (qk/v dims per head)=[{sizes}], group_size={lay.group_size}, rope={lay.rope}"

    # -------------------------------------------------------------- manifest

    def structure(self) -> dict:
        projections = {}
        for role in self.roles:
            kind, fan_in, fan_out, bias = _shape(self.projection(role))
            projections[role] = {"name": self.names[role], "kind": kind, "in": fan_in, "out": fan_out, "bias": bias}
        return {"class": "CompactAttention", "layout": self.layout.to_dict(), "projections": projections,
                "scaling": self.scaling, "dropout": self.dropout, "out_dropout": self.out_dropout,
                "is_causal": self.is_causal, "layer_idx": self.layer_idx}

    @classmethod
    def from_structure(cls, structure: dict, dtype: torch.dtype | None = None) -> CompactAttention:
        if structure.get("class") != "CompactAttention":
            raise ModelError(f"structure of class {structure.get('class')!r} is not a CompactAttention: check the saved layout")
        try:
            layout = AttentionLayout.from_dict(structure["layout"])
            specs = structure["projections"]
            projections = {role: _projection(s["kind"], int(s["in"]), int(s["out"]), bool(s["bias"]), dtype)
                           for role, s in specs.items()}
            names = {role: str(s["name"]) for role, s in specs.items()}
            layer_idx = structure.get("layer_idx")
            return cls(layout, projections, names, scaling=float(structure["scaling"]), dropout=float(structure["dropout"]),
                       out_dropout=float(structure.get("out_dropout", 0.0)), is_causal=bool(structure["is_causal"]),
                       layer_idx=None if layer_idx is None else int(layer_idx))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"CompactAttention structure is malformed ({e}): the sparseforge.json is damaged; save the model again") \
                from None


def dropout_of(module: nn.Module, attrs: tuple[str, ...]) -> float:
    """The dropout probability an HF attention module keeps under one of ``attrs`` (0 if none)."""
    for attr in attrs:
        value = getattr(module, attr, None)
        if isinstance(value, nn.Dropout):
            return float(value.p)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return 0.0


def has_only_projections(module: nn.Module, projection_names: set[str]) -> bool:
    """True if every parameter of ``module`` belongs to one of its named projections (no per-head norms...)."""
    for name, _ in module.named_parameters():
        if name.split(".")[0] not in projection_names:
            return False
    return True


def _register() -> None:
    try:
        from ..models.modules import register_structure_class
    except ImportError:  # the registry is not there yet: manifests cannot name this class
        return
    register_structure_class("CompactAttention", "sparseforge.structured.attention:CompactAttention")


_register()
