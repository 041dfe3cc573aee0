"""Model adapters: the only place that knows where blocks and linear layers are.

An adapter names, for one architecture family, the prunable linear layers of a
decoder block in execution order, grouped by shared input (q/k/v read the same
tensor, so they share one Hessian). The block list itself is found generically
from the model's ``_no_split_modules``, as Accelerate does for device maps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import ModelError


@dataclass(frozen=True)
class FFNSpec:
    """Where a block's feed-forward network is and what its activation is."""

    activation: str  # "relu", "gelu" or "silu_gated"
    up: str
    down: str
    gate: str | None = None
    #: attribute path (from the block) of the activation callable the model applies
    act: str | None = None
    #: the module (from the block) whose forward in eval mode is exactly down(act(gate(x)) * up(x)),
    #: or down(act(up(x))), token by token; None where the FFN is not one module (OPT) or adds
    #: more (BERT's output LayerNorm). Lets the pruning engine run the FFN in token chunks.
    module: str | None = None

    @property
    def linears(self) -> dict[str, str]:
        """Role ("gate", "up", "down") -> layer name, in execution order."""
        roles = {"gate": self.gate, "up": self.up, "down": self.down}
        return {role: name for role, name in roles.items() if name}


@dataclass(frozen=True)
class AttentionSpec:
    """Where a block's attention projections are and how its heads are laid out.

    Names are relative to the block. ``qkv`` names a fused projection (GPT-2's
    c_attn: query, key and value stacked along the outputs, in that order); then
    ``q``, ``k`` and ``v`` are None. Key/value head ``g`` serves query heads
    ``g * group_size ... (g + 1) * group_size - 1`` (grouped-query attention;
    ``num_kv_heads == num_heads`` is plain multi-head attention). With ``rope``,
    rotary embeddings rotate the dimension pairs (j, j + head_dim / 2) of every
    query and key head (the rotate-half convention of LLaMA-family models).
    """

    module: str  # the attention module, e.g. "self_attn"
    q: str | None
    k: str | None
    v: str | None
    o: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: bool = False
    qkv: str | None = None

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class ResidualBranch:
    """One residual branch of a pre-norm block: ``x = x + module(norm(x))``.

    Names are relative to the block. With ``block_kwargs`` the module is called with the keyword
    arguments the block was called with (attention: position embeddings, mask); its output, or
    the first element of a tuple, is what is added. The branch's output is its last linear
    layer's output: nothing follows that layer but dropout (identity in eval mode).
    """

    norm: str
    module: str
    block_kwargs: bool = False


@runtime_checkable
class ReparametrisedLinear(Protocol):
    """A linear layer whose weight is computed from other parameters (LoSparse's U V + S, a compact layer).

    It has no ``.weight``: ``dense_weight()`` materialises the (out x in) weight it applies,
    so statistics and evaluation see it like a Linear. Writing a weight into it is not
    possible (``set_weight`` refuses); the method that owns it updates its factors.
    """

    in_features: int
    out_features: int

    def dense_weight(self) -> torch.Tensor:
        """The (out x in) weight the layer applies, computed from its parameters."""
        ...


#: set on a model by loading.load_model: the names of the weights it initialised randomly (a new classifier head),
#: which a resumed run's fingerprint of its starting model leaves out
NEW_WEIGHTS_ATTR = "sparseforge_new_weights"


def is_reparametrised(module: nn.Module) -> bool:
    return isinstance(module, ReparametrisedLinear) and not isinstance(module, (nn.Linear, Conv1D))


def is_prunable(module: nn.Module) -> bool:
    """A linear layer, a reparametrised linear, or an adapter layer wrapping either (its ``base``)."""
    inner = getattr(module, "base", module)
    return isinstance(inner, (nn.Linear, Conv1D)) or is_reparametrised(inner)


def get_weight(module: nn.Module) -> torch.Tensor:
    """The weight in (out x in) layout; GPT-2's Conv1D stores it transposed; a reparametrised
    linear computes it (a new tensor, not a view of a parameter)."""
    if is_reparametrised(module):
        return module.dense_weight()
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an (out x in) weight back in the module's own layout and dtype."""
    if is_reparametrised(module):
        raise ModelError(
            f"cannot write a weight into {type(module).__name__}: its weight is computed from its factors; "
            "update the factors, or replace the layer with a plain nn.Linear of its dense_weight() first"
        )
    target = module.weight
    with torch.no_grad():
        target.copy_(weight.T if isinstance(module, Conv1D) else weight)


def in_features(module: nn.Module) -> int:
    if is_reparametrised(module):
        return int(module.in_features)
    return get_weight(module).shape[1]


class ModelAdapter:
    """Architecture knowledge for one family. Subclasses set the class attributes."""

    model_types: tuple[str, ...] = ()
    #: linear layers of a block (names relative to it), in execution order,
    #: grouped so that every member of a group reads the same input tensor
    linear_groups: tuple[tuple[str, ...], ...] = ()
    ffn: FFNSpec | None = None
    #: set where a block's forward in eval mode is exactly these branches in order and nothing else
    #: (pre-norm decoders); lets one-pass pruning run the block in token chunks. Empty elsewhere:
    #: post-norm encoders (BERT), OPT (its FFN is not one module)
    residual_branches: tuple[ResidualBranch, ...] = ()
    #: causal decoder (LM head, KV cache) or bidirectional encoder
    causal: bool = True
    #: where the blocks are when the model declares no ``_no_split_modules`` (suffix of a module path)
    blocks_path: str | None = None

    def __init__(self, model: nn.Module):
        self.model = model
        self.blocks_name, self.blocks = find_blocks(model, self.blocks_path)

    def attention(self) -> AttentionSpec:
        """The attention layout of every block (from the config: all blocks alike)."""
        raise ModelError(f"{type(self).__name__} does not describe its attention: structured pruning needs it")

    @property
    def linear_names(self) -> list[str]:
        return [name for group in self.linear_groups for name in group]

    def block_linears(self, block: nn.Module) -> dict[str, nn.Module]:
        return {name: block.get_submodule(name) for name in self.linear_names}

    def ffn_activation(self, block: nn.Module):
        """The activation callable the block's FFN applies."""
        obj = block
        for part in (self.ffn.act or "").split("."):
            obj = getattr(obj, part) if part else obj
        return obj

    def ffn_in_chunks(self, block: nn.Module, chunk_tokens: int):
        """A forward for the block's FFN module that computes the intermediate ``chunk_tokens`` tokens
        at a time, or None if the family's FFN is not one module.

        Same result as the module's own forward (up to float rounding): the FFN acts on each token
        alone. The wide intermediate is written into one buffer, so only a chunk's worth of the
        gate, up and activation temporaries exists at once instead of three intermediates of the
        whole input; the down projection then reads the whole buffer in one call, so a hook on it
        sees every token at once, as it would with the module's own forward.
        """
        if self.ffn is None or self.ffn.module is None:
            return None
        gate = block.get_submodule(self.ffn.gate) if self.ffn.gate else None
        up, down = block.get_submodule(self.ffn.up), block.get_submodule(self.ffn.down)
        act = self.ffn_activation(block)

        def forward(x: torch.Tensor) -> torch.Tensor:
            flat = x.reshape(-1, x.shape[-1])
            hidden = None
            for start in range(0, flat.shape[0], chunk_tokens):
                part = flat[start:start + chunk_tokens]
                value = act(up(part)) if gate is None else act(gate(part)).mul_(up(part))
                if hidden is None:
                    hidden = value.new_empty(flat.shape[0], value.shape[-1])
                hidden[start:start + part.shape[0]] = value
                del value
            return down(hidden).reshape(*x.shape[:-1], -1)

        return forward

    def block_prefix(self, index: int) -> str:
        return f"{self.blocks_name}.{index}"

    def context_length(self) -> int:
        config = self.model.config
        for key in ("max_position_embeddings", "n_positions", "n_ctx"):
            value = getattr(config, key, None)
            if value:
                return int(value)
        return 2**31

    def check(self) -> None:
        """Fail early and clearly if the model does not look like this family."""
        block = self.blocks[0]
        for name in self.linear_names:
            try:
                module = block.get_submodule(name)
            except AttributeError:
                raise ModelError(
                    f"{type(self).__name__} expects a layer '{name}' in {type(block).__name__}; "
                    "this checkpoint differs from its family: write an adapter for it"
                ) from None
            if not is_prunable(module):
                raise ModelError(f"'{name}' in {type(block).__name__} is not a Linear layer "
                                 f"(nor a reparametrised one with dense_weight()): {type(module).__name__}")


def find_blocks(model: nn.Module, blocks_path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The ModuleList of blocks, found from ``_no_split_modules`` (or the adapter's ``blocks_path``)."""
    block_classes = set(getattr(model, "_no_split_modules", None) or [])
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if all(type(child).__name__ in block_classes for child in module):
                return name, module
            if blocks_path and (name == blocks_path or name.endswith("." + blocks_path)):
                return name, module
    raise ModelError(
        f"cannot find the decoder blocks of {type(model).__name__}: it declares no "
        "_no_split_modules block class; write an adapter that names them"
    )
