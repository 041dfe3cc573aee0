"""One-pass pruning of a pre-norm block, a few calibration windows at a time.

A one-pass forward of all calibration tokens at once holds every full-size
intermediate of the block together (query, key, value, attention output, the
wide FFN intermediate, the residual sums): that transient, not the model, set
the peak memory. Here the block runs branch by branch (``x += module(norm(x))``,
the adapter's ``residual_branches``) and each branch in chunks of windows,
while keeping the true-sequential order: a group of layers gathers its
statistics from *every* token, then is pruned, before any token goes past it.

For each group of a branch, in execution order, the branch runs chunk by chunk
up to the group's first layer, where a hook adds the chunk to the statistics
and stops the call; the prefix before a group is cheap except for the last
group (attention before o_proj, gate/up before down_proj). The last group's
input is kept as it is gathered, so the branch's output is that layer applied
to it; for the chunks not kept the branch runs once more after pruning.
Recomputing is the same arithmetic on the same tensors, so the output is the
same bit for bit either way. How much of a last input wider than the residual
stream (the FFN intermediate, ~2.7x as wide in SmolLM2) is kept is
``keep_wide``: "all" (fastest), "stream" (its first chunks, up to the size
of the residual stream: beside the stream at most one stream's worth of
activations is held) or "none". The attention output, as wide as the stream,
is always kept. Where the last group is more than one layer (SparseLLM's
joint FFN) the branch runs once more after pruning. The residual stream is
updated in place: the block's input tensor becomes its output.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from ..errors import ModelError
from ..models.base import ResidualBranch, in_features

#: how much of a branch's last input wider than the residual stream the one pass keeps
KEEP_WIDE = ("all", "stream", "none")


class _StopBranch(Exception):
    pass


def slice_windows(obj, start: int, stop: int, n_windows: int):
    """``obj`` (a block keyword argument) restricted to windows ``start:stop``: tensors of two or more
    dimensions whose first is the window count are sliced; the rest (shared rotary tables of batch 1,
    1-D positions, flags) pass as they are."""
    if isinstance(obj, torch.Tensor):
        return obj[start:stop] if obj.dim() >= 2 and obj.shape[0] == n_windows else obj
    if isinstance(obj, tuple):
        return tuple(slice_windows(o, start, stop, n_windows) for o in obj)
    if isinstance(obj, list):
        return [slice_windows(o, start, stop, n_windows) for o in obj]
    if isinstance(obj, dict):
        return {k: slice_windows(v, start, stop, n_windows) for k, v in obj.items()}
    return obj


def per_window_state(obj, n_windows: int) -> bool:
    """Whether ``obj`` is an object ``slice_windows`` would pass whole although it holds a tensor per
    window (a flex-attention BlockMask built for a padded batch, say): a chunk would see every window's."""
    if obj is None or isinstance(obj, (torch.Tensor, bool, int, float, str)):
        return False
    if isinstance(obj, (tuple, list)):
        return any(per_window_state(o, n_windows) for o in obj)
    if isinstance(obj, dict):
        return any(per_window_state(v, n_windows) for v in obj.values())
    held = vars(obj).values() if hasattr(obj, "__dict__") else ()
    return n_windows > 1 and any(isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == n_windows
                                 for t in held)


def block_keywords(block: nn.Module, args: tuple, kwargs: dict, n_windows: int) -> dict | None:
    """The block's arguments after the hidden states, all by name (GPT-2's model passes some by
    position), None values kept (some modules take a mask without a default: Qwen2's attention); None
    if they do not bind to the block's signature, or if one holds per-window state that cannot be
    sliced into chunks (the block then runs whole)."""
    try:
        bound = inspect.signature(block.forward).bind(None, *args, **kwargs)
    except TypeError:
        return None
    named = {}
    for position, (name, value) in enumerate(bound.arguments.items()):
        param = bound.signature.parameters[name]
        if position == 0:
            if param.kind is inspect.Parameter.VAR_POSITIONAL:
                return None  # a signature hidden behind *args: the names of the arguments are unknown
            continue  # the hidden states
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif param.kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                return None
        else:
            named[name] = value
    return None if per_window_state(named, n_windows) else named


def _accepted_keywords(module: nn.Module, chunk_kwargs: list[dict]) -> list[dict]:
    """Each chunk's block keywords that the branch module takes: all where its forward has ``**kwargs``,
    else those it names (a block passes some only its own code reads, e.g. GPT-2's encoder states)."""
    parameters = inspect.signature(module.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return chunk_kwargs
    return [{k: v for k, v in kwargs.items() if k in parameters} for kwargs in chunk_kwargs]


def _call(module: nn.Module, x: torch.Tensor, kwargs: dict | None) -> torch.Tensor:
    out = module(x, **kwargs) if kwargs is not None else module(x)
    return out[0] if isinstance(out, (tuple, list)) else out


def prune_block_in_chunks(block: nn.Module, branches: tuple[ResidualBranch, ...], linear_names: list[str],
                          hidden: torch.Tensor, kwargs: dict, groups: list, chunk_windows: int,
                          keep_wide: str = "all") -> torch.Tensor:
    """Prune ``groups`` (objects with ``names``, ``stats.add`` and ``prune()``, in execution order) and
    return the pruned block's output, computed in place in ``hidden`` (windows x tokens x width).
    ``keep_wide``: how much of a branch's last input wider than ``hidden`` is kept ("all", "stream": up to
    ``hidden``'s size, "none"); the rest is recomputed."""
    if keep_wide not in KEEP_WIDE:
        raise ValueError(f"keep_wide must be one of {', '.join(KEEP_WIDE)}, not {keep_wide!r}")
    n_windows = hidden.shape[0]
    spans = [(s, min(s + chunk_windows, n_windows)) for s in range(0, n_windows, chunk_windows)]
    chunk_kwargs = [slice_windows(kwargs, s, e, n_windows) for s, e in spans]
    plan = []  # checked before any work: a wrong adapter must fail before the residual changes
    for branch in branches:
        prefix = branch.module + "."
        linears = [n for n in linear_names if n.startswith(prefix)]
        if not linears:
            raise ModelError(f"residual branch '{branch.module}' holds no linear layer of the adapter: fix the adapter")
        plan.append((branch, [g for g in groups if g.names[0].startswith(prefix)], linears[-1]))
    claimed = {id(g) for _, mine, _ in plan for g in mine}
    stray = [g.names[0] for g in groups if id(g) not in claimed]
    if stray:
        raise ModelError(f"{', '.join(stray)} lie in no residual branch of the adapter: fix the adapter")
    for branch, mine, last_linear in plan:
        wide = in_features(block.get_submodule(last_linear)) > hidden.shape[-1]
        budget = {"all": math.inf, "stream": hidden.numel(), "none": 0}[keep_wide] if wide else math.inf
        _prune_branch(block, branch, mine, last_linear, hidden, spans, chunk_kwargs, budget)
    return hidden


def _prune_branch(block, branch: ResidualBranch, groups: list, last_linear: str, hidden: torch.Tensor,
                  spans: list[tuple[int, int]], chunk_kwargs: list[dict], keep_budget: float) -> None:
    """Prune the branch's groups in order, then add the pruned branch's output to ``hidden``. Where the
    last group is the last layer alone, its input is kept as it is gathered, chunk by chunk while the
    chunks kept hold at most ``keep_budget`` elements; the branch runs once more for the other chunks."""
    norm, module = block.get_submodule(branch.norm), block.get_submodule(branch.module)
    if branch.block_kwargs:
        chunk_kwargs = _accepted_keywords(module, chunk_kwargs)

    def run(i: int) -> torch.Tensor:
        s, e = spans[i]
        return _call(module, norm(hidden[s:e]), chunk_kwargs[i] if branch.block_kwargs else None)

    kept: list[torch.Tensor] | None = None
    for position, group in enumerate(groups):
        keep = position == len(groups) - 1 and list(group.names) == [last_linear]
        kept = [] if keep else None
        seen = [0]
        room = [keep_budget]

        def gather(mod, args, group=group, kept=kept, seen=seen, room=room):
            group.stats.add(args[0])
            seen[0] += 1
            if kept is not None:
                if args[0].numel() <= room[0]:
                    kept.append(args[0])
                    room[0] -= args[0].numel()
                else:
                    kept.append(None)  # recomputed after pruning
                    room[0] = 0  # the kept chunks are the first ones
            raise _StopBranch

        handle = block.get_submodule(group.names[0]).register_forward_pre_hook(gather)
        try:
            for i in range(len(spans)):
                try:
                    run(i)
                except _StopBranch:
                    pass
        finally:
            handle.remove()
        if seen[0] != len(spans):
            raise ModelError(f"{group.names[0]} was not called in every chunk of '{branch.module}': fix the adapter")
        group.prune()
    for i, (s, e) in enumerate(spans):
        out = block.get_submodule(last_linear)(kept[i]) if kept is not None and kept[i] is not None else run(i)
        hidden[s:e] += out
        if kept is not None:
            kept[i] = None  # free the chunk as soon as it is used
