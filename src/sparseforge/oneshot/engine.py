"""The sequential calibration engine (METHODS.md section 7), shared by every one-shot method.

Calibration windows run through the embeddings once; the inputs of block 0 are
captured; then block by block: gather each layer group's input statistics,
prune, and feed the block's outputs to the next block. Only one block's
activations live at a time.

When all calibration windows fit one forward call (``batch_size`` unset, the
default) each block runs *once*: a pre-hook on the first layer of each group
gathers statistics from the full calibration input and prunes the group before
it computes, so later groups see the outputs of already-pruned ones (the
"true sequential" order) at half the forward cost. For pre-norm families
(the adapter's ``residual_branches``) that pass runs branch by branch over a
few windows at a time (chunked.py), so no full-size intermediate of all
calibration tokens exists at once. With micro-batches the
statistics must be summed over several calls, so the block runs twice:
statistics pass, prune, output pass.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError, ModelError
from ..loading import TORCH_DTYPES
from ..measure import release_free_memory
from ..models import get_adapter, get_weight, in_features, set_weight
from ..options import PROPAGATE
from ..sparsity.masks import sparsity_of
from ..sparsity.pattern import Pattern
from .chunked import block_keywords, prune_block_in_chunks
from .methods import get_method
from .sparsellm import DEFAULT_AUX_TOKENS
from .stats import InputStats

log = logging.getLogger(__name__)

#: tokens per chunk while a block is pruned in one pass (whole windows: 4 x 512 for SmolLM2; its FFN
#: intermediate of 2048 x 1536 floats = 12 MiB): the temporaries of all calibration tokens at once
#: were the largest transient of a one-pass block
CHUNK_TOKENS = 2048


@dataclass
class OneShotConfig:
    """Settings of a one-shot pruning run. Every field is a CLI option of ``sparseforge prune``."""

    method: str = "sparsegpt"
    pattern: Pattern = field(default_factory=lambda: Pattern(0.5))
    #: glob on the full layer name -> pattern; the first match wins (e.g. {"*.down_proj": "0.6"})
    overrides: dict[str, Pattern] = field(default_factory=dict)
    #: globs of layer names left dense (lm_head and embeddings are never pruned)
    skip: tuple[str, ...] = ()
    #: prune only the first fraction of the decoder blocks (SparseLLM's tables use 0.5)
    block_fraction: float = 1.0
    #: inputs of the next block: outputs of the "pruned" block (papers) or of the "dense" one
    propagate: str = "pruned"
    #: calibration windows per forward call; None = all at once (one pass per block)
    batch_size: int | None = None
    #: one pass: keep none of the FFN intermediate for the block's output, recompute it (the lowest
    #: peak; the same weights and outputs). Otherwise the Hessian methods keep it up to the residual
    #: stream's size and recompute the rest, Wanda and magnitude keep it whole (OneShotMethod.keep_wide)
    low_memory: bool = False
    #: dtype of the block forward passes (statistics stay float32); None = the model's
    compute_dtype: str | None = None
    dampening: float = 0.01
    block_size: int = 128
    #: SparseLLM: weights of the output/pre-activation terms (alpha) and of the activation
    #: term (beta); None = the family default. Only beta/alpha changes the result.
    alpha: float | None = None
    beta: float | None = None
    #: SparseLLM outer iterations; 0 = SparseGPT on every layer
    iterations: int = 4
    #: SparseLLM: calibration tokens iterations 1..K run on (a seeded random subset); 0 = all.
    #: Iteration 0 (SparseGPT) uses every token; the result must beat it on held-out tokens.
    aux_tokens: int = DEFAULT_AUX_TOKENS

    def __post_init__(self):
        self.pattern = Pattern.parse(self.pattern)
        self.overrides = {k: Pattern.parse(v) for k, v in self.overrides.items()}
        self.skip = tuple(self.skip)
        get_method(self.method)
        if self.propagate not in PROPAGATE:
            raise ConfigError(f"propagate must be one of {', '.join(PROPAGATE)}, not '{self.propagate}'")
        if not 0.0 < self.block_fraction <= 1.0:
            raise ConfigError(f"block fraction {self.block_fraction} must be in (0, 1]")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch size {self.batch_size} must be at least 1")
        if self.compute_dtype is not None and self.compute_dtype not in TORCH_DTYPES:
            raise ConfigError(f"compute dtype '{self.compute_dtype}' unknown: choose from {', '.join(TORCH_DTYPES)}")
        if not self.dampening > 0:
            raise ConfigError(f"dampening {self.dampening} must be positive, e.g. 0.01")
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} {value} must be positive, e.g. 5")
        if self.iterations < 0:
            raise ConfigError(f"iterations {self.iterations} must be 0 or more")
        if self.aux_tokens < 0:
            raise ConfigError(f"aux tokens {self.aux_tokens} must be 0 (all) or more, e.g. 3072")

    def pattern_for(self, layer: str) -> Pattern | None:
        """The pattern of a layer, or None if it stays dense."""
        if any(fnmatch.fnmatchcase(layer, glob) for glob in self.skip):
            return None
        for glob, pattern in self.overrides.items():
            if fnmatch.fnmatchcase(layer, glob):
                return pattern
        return self.pattern

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "pattern": str(self.pattern),
            "overrides": {k: str(v) for k, v in self.overrides.items()},
            "skip": list(self.skip),
            "block_fraction": self.block_fraction,
            "propagate": self.propagate,
            "batch_size": self.batch_size,
            "low_memory": self.low_memory,
            "compute_dtype": self.compute_dtype,
            "dampening": self.dampening,
            "block_size": self.block_size,
            **({"alpha": self.alpha, "beta": self.beta, "iterations": self.iterations, "aux_tokens": self.aux_tokens}
               if get_method(self.method).joint_ffn else {}),
        }


@dataclass
class LayerResult:
    name: str
    pattern: str
    sparsity: float
    numel: int
    #: ||(W - W')X||^2 / ||W X||^2 on the calibration inputs, where a Hessian was gathered
    relative_error: float | None = None


@dataclass
class OneShotReport:
    config: dict
    layers: list[LayerResult]
    seconds: float
    n_windows: int
    seq_len: int
    #: where the calibration windows came from and their content hash
    calibration: dict = field(default_factory=dict)
    #: method-specific logs keyed by module name (SparseLLM: objective per iteration of each FFN)
    details: dict = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all pruned layers."""
        total = sum(layer.numel for layer in self.layers)
        return sum(layer.sparsity * layer.numel for layer in self.layers) / max(total, 1)

    def to_dict(self) -> dict:
        return {
            "config": self.config,
            "seconds": round(self.seconds, 3),
            "n_windows": self.n_windows,
            "seq_len": self.seq_len,
            "calibration": self.calibration,
            "details": self.details,
            "sparsity": self.sparsity,
            "layers": [vars(layer) for layer in self.layers],
        }


class _StopForward(Exception):
    pass


@dataclass
class _BlockCall:
    """Everything a block is called with for one micro-batch, hidden states apart."""

    args: tuple
    kwargs: dict


def _cast_floats(obj, dtype):
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_cast_floats(o, dtype) for o in obj)
    if isinstance(obj, list):
        return [_cast_floats(o, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _cast_floats(v, dtype) for k, v in obj.items()}
    return obj


def capture_block_inputs(model: nn.Module, blocks, batches: list[torch.Tensor], last: int | None = None):
    """Run the embeddings and return block 0's hidden states per batch and, per block up to
    ``last``, the other arguments the model passes it per batch (``calls[block][batch]``).

    Each block's arguments are recorded, not block 0's reused: models that mix layer types
    (Qwen2/Qwen3 with ``max_window_layers``, Gemma-style alternation) hand sliding-window
    layers another attention mask than full-attention ones. The blocks do no work here: each
    is replaced for the pass by a recorder that returns its input unchanged (the arguments
    other than the hidden states come from the input ids, not from the blocks' outputs). A family
    whose blocks pass more than hidden states to the next (T5's position bias) breaks that
    assumption and needs its own capture."""
    blocks = list(blocks)
    last = len(blocks) - 1 if last is None else last
    hidden: list[torch.Tensor] = []
    calls: list[list[_BlockCall]] = [[] for _ in range(last + 1)]

    def recorder(index):
        def record(*args, **kwargs):
            if args:
                h, rest = args[0], args[1:]
            else:
                h, rest = kwargs.pop("hidden_states"), ()
            if index == 0:
                hidden.append(h)
            calls[index].append(_BlockCall(rest, dict(kwargs)))
            if index == last:
                raise _StopForward
            return h
        return record

    with ExitStack() as stack:
        for index in range(last + 1):
            stack.enter_context(_forward_replaced(blocks[index], recorder(index)))
        for batch in batches:
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
    for index, block_calls in enumerate(calls):
        if len(block_calls) != len(batches):
            raise ModelError(f"decoder block {index} was called {len(block_calls)} times for {len(batches)} batches "
                             "(each block once per batch expected): the adapter points at the wrong blocks")
    return hidden, calls


def _run_block(block, hidden, calls, compute_dtype, out_dtype, keep: bool = True):
    """The block's outputs for every micro-batch; with ``keep=False`` a statistics pass, whose hooks
    may stop each forward once the last group has its inputs, and whose outputs are not kept."""
    outputs = []
    for h, call in zip(hidden, calls):
        args, kwargs = call.args, call.kwargs
        if compute_dtype is not None:
            h, args, kwargs = h.to(compute_dtype), _cast_floats(args, compute_dtype), _cast_floats(kwargs, compute_dtype)
        try:
            out = block(h, *args, **kwargs)
        except _StopForward:
            continue
        if keep:
            out = out[0] if isinstance(out, (tuple, list)) else out
            outputs.append(out.to(out_dtype))
    return outputs


def _relative_error(original: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    delta = original - pruned
    num = ((delta @ hessian) * delta).sum()
    den = ((original @ hessian) * original).sum()
    return float(num / den) if den > 0 else 0.0


class _GroupPruner:
    """Prunes one group of layers that share an input, from its gathered statistics."""

    def __init__(self, method, names, modules, patterns, originals, options, stats_kind, block_name):
        self.method, self.names, self.modules = method, names, modules
        self.patterns, self.originals, self.options = patterns, originals, options
        first = names[0]
        self.stats = InputStats(in_features(modules[first]), stats_kind, layer=f"{block_name}.{first}")
        self.block_name = block_name
        self.pruned: dict[str, torch.Tensor] | None = None

    def prune(self) -> None:
        weights = {n: self.originals[n] for n in self.names}
        self.pruned = self.method.prune_group(weights, self.stats, self.patterns, self.options)
        for name in self.names:
            set_weight(self.modules[name], self.pruned[name])

    def results(self) -> list[LayerResult]:
        hessian = self.stats.hessian if self.stats.kind == "hessian" else None
        out = []
        for name in self.names:
            weight = self.pruned[name]
            err = _relative_error(self.originals[name], weight, hessian) if hessian is not None else None
            out.append(
                LayerResult(f"{self.block_name}.{name}", str(self.patterns[name]), sparsity_of(weight), weight.numel(), err)
            )
        return out


#: SparseLLM's alpha = beta per FFN family (METHODS.md section 3); only their ratio matters
SPARSELLM_DEFAULTS = {"relu": 0.1, "silu_gated": 5.0, "gelu": 1.0}


class _InputCollector:
    """Keeps a layer's inputs (all calibration tokens), for solvers that need X itself."""

    def __init__(self):
        self.chunks = []

    def add(self, inputs: torch.Tensor) -> None:
        self.chunks.append(inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float32))

    def take(self) -> torch.Tensor:
        x = torch.cat(self.chunks) if len(self.chunks) > 1 else self.chunks[0]
        self.chunks = []
        return x


class _FFNPruner:
    """Prunes a block's whole FFN jointly (SparseLLM) from the FFN's calibration inputs."""

    def __init__(self, adapter, block, layers, modules, originals, config, block_name):
        spec = adapter.ffn
        self.roles = spec.linears  # role -> layer name
        self.names = list(self.roles.values())
        self.modules, self.originals, self.block_name = modules, originals, block_name
        self.patterns = {role: layers[name] for role, name in self.roles.items()}
        self.activation = spec.activation
        act = adapter.ffn_activation(block)
        if spec.activation == "relu" and not isinstance(act, nn.ReLU):
            raise ModelError(f"SparseLLM's ReLU closed form needs a ReLU FFN; {block_name} uses {act}: "
                              "use --method sparsegpt")
        self.model_activation = act if spec.activation == "gelu" else None
        default = SPARSELLM_DEFAULTS[spec.activation]
        self.alpha = config.alpha if config.alpha is not None else default
        self.beta = config.beta if config.beta is not None else default
        self.config = config
        self.stats = _InputCollector()
        self.pruned = None
        self.log = None

    def prune(self) -> None:
        from .sparsellm import FFNProblem, sparsellm_ffn

        problem = FFNProblem(
            activation=self.activation,
            inputs=self.stats.take(),
            weights={role: self.originals[name] for role, name in self.roles.items()},
            biases={role: (None if self.modules[name].bias is None else self.modules[name].bias.detach().float())
                    for role, name in self.roles.items()},
            model_activation=self.model_activation,
        )
        result = sparsellm_ffn(problem, self.patterns, alpha=self.alpha, beta=self.beta,
                               iterations=self.config.iterations, dampening=self.config.dampening,
                               block_size=self.config.block_size, layer=self.block_name,
                               aux_tokens=self.config.aux_tokens)
        self.pruned = {self.roles[role]: w for role, w in result.weights.items()}
        for name in self.names:
            set_weight(self.modules[name], self.pruned[name])
        self.log = {"alpha": self.alpha, "beta": self.beta, "objective": result.objective,
                    "output_error": result.output_error, "best_iteration": result.best_iteration,
                    "aux_tokens": result.aux_tokens, "held_out_error": result.held_out_error}
        log.info("%s FFN: objective %s; output error %.4g (SparseGPT) -> %.4g", self.block_name,
                 " > ".join(f"{v:.4g}" for v in result.objective), result.output_error[0],
                 result.output_error[result.best_iteration])

    def results(self) -> list[LayerResult]:
        return [LayerResult(f"{self.block_name}.{n}", str(self.patterns[r]), sparsity_of(self.pruned[n]),
                            self.pruned[n].numel()) for r, n in self.roles.items()]


def plan_layers(model: nn.Module, config: OneShotConfig) -> list[dict[str, Pattern]]:
    """Every block's ``{layer name: pattern}``, checked against the layers' widths and names.

    Works on a model built on the meta device (names and shapes, no weights), so the command
    line refuses an impossible setting before it loads anything: an N:M whose M does not
    divide a layer's input width, an override or skip glob that matches no layer (a typo
    would otherwise be ignored), or skips that leave nothing to prune.
    """
    adapter = get_adapter(model)
    blocks = adapter.blocks
    n_pruned_blocks = math.ceil(config.block_fraction * len(blocks))
    names: list[str] = []
    plan: list[dict[str, Pattern]] = []
    for index, block in enumerate(blocks):
        prefix = adapter.block_prefix(index)
        layers = {}
        for name, module in adapter.block_linears(block).items():
            names.append(f"{prefix}.{name}")
            if index >= n_pruned_blocks:
                continue
            pattern = config.pattern_for(f"{prefix}.{name}")
            if pattern is not None:
                pattern.check_width(in_features(module), f"{prefix}.{name}")
                layers[name] = pattern
        plan.append(layers)
    for flag, globs in (("--override", list(config.overrides)), ("--skip", list(config.skip))):
        for glob in globs:
            if not any(fnmatch.fnmatchcase(n, glob) for n in names):
                raise ConfigError(f"{flag} '{glob}' matches no layer (they are named like '{names[0]}'): fix the glob; "
                                  "`sparseforge info MODEL --layers` lists them")
    if not any(plan):
        raise ConfigError(f"--skip {' '.join(config.skip)} leaves no layer to prune: drop a --skip (or raise --block-fraction)")
    return plan


def prune_model(
    model: nn.Module, calibration: torch.Tensor | None, config: OneShotConfig, progress: bool = True
) -> OneShotReport:
    """Prune ``model`` in place with ``config.method``; ``calibration`` is (n, seq_len) token ids."""
    start = time.perf_counter()
    method = get_method(config.method)
    adapter = get_adapter(model)
    blocks = adapter.blocks
    plan = plan_layers(model, config)  # a bad pattern or glob fails before any work
    last_block = max((i for i, layers in enumerate(plan) if layers), default=-1)

    options = {"block_size": config.block_size, "dampening": config.dampening}
    n_windows = 0 if calibration is None else int(calibration.shape[0])
    seq_len = 0 if calibration is None else int(calibration.shape[1])
    results: list[LayerResult] = []
    details: dict = {}
    model_dtype = next(model.parameters()).dtype
    compute_dtype = TORCH_DTYPES[config.compute_dtype] if config.compute_dtype else None
    if compute_dtype == model_dtype:
        compute_dtype = None

    if method.stats_kind is not None and n_windows == 0:
        raise ConfigError(f"method '{method.name}' needs calibration data")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        if last_block < 0:
            pass  # nothing selected: no block to run
        elif method.stats_kind is None:
            for index in tqdm(range(last_block + 1), desc=f"{method.name}", disable=not progress):
                results += _prune_without_data(adapter, index, plan[index], method, options)
        else:
            batch_size = config.batch_size or n_windows
            batches = list(torch.split(calibration, batch_size))
            if config.low_memory and not _branchwise_one_pass(adapter, config, len(batches)):
                log.warning("low_memory applies to the one pass of pre-norm blocks with pruned outputs "
                            "propagated; this run keeps no FFN intermediate to drop, so it changes nothing")
            release_free_memory()
            hidden, calls = capture_block_inputs(model, blocks, batches, last_block)
            if (config.low_memory and _branchwise_one_pass(adapter, config, len(batches))
                    and block_keywords(blocks[0], calls[0][0].args, calls[0][0].kwargs, len(batches[0])) is None):
                # every block receives the same arguments: the first block's decide for all
                log.warning("low_memory changes nothing here: the blocks' arguments cannot be split into chunks of "
                            "windows (per-window state such as a padded batch's mask, or an unknown signature), so "
                            "each block runs whole")
            bar = tqdm(range(last_block + 1), desc=f"{method.name} {config.pattern}", disable=not progress)
            for index in bar:
                t0 = time.perf_counter()
                block_results, hidden, block_details = _prune_block(
                    adapter, index, plan[index], method, options, hidden, calls[index], config, compute_dtype,
                    model_dtype,
                )
                calls[index] = None  # this block's masks are no longer needed
                results += block_results
                details.update(block_details)
                release_free_memory()
                log.info(
                    "block %d/%d: %d layers pruned in %.2fs",
                    index + 1, last_block + 1, len(block_results), time.perf_counter() - t0,
                )
            del hidden, calls
    model.train(was_training)
    return OneShotReport(config.to_dict(), results, time.perf_counter() - start, n_windows, seq_len, details=details)


def _branchwise_one_pass(adapter, config: OneShotConfig, n_batches: int) -> bool:
    """Whether blocks are pruned branch by branch in chunks (chunked.py): one pass over all windows,
    pruned outputs propagated, and a family whose blocks are residual branches."""
    return n_batches == 1 and config.propagate == "pruned" and bool(adapter.residual_branches)


def keep_wide_inputs(method, config: OneShotConfig) -> str:
    """How much of the FFN intermediate the one pass keeps for the block's output: the method's own
    choice (OneShotMethod.keep_wide), or none under ``low_memory``."""
    return "none" if config.low_memory else method.keep_wide


def _prune_without_data(adapter, index, layers, method, options) -> list[LayerResult]:
    block = adapter.blocks[index]
    modules = adapter.block_linears(block)
    prefix = adapter.block_prefix(index)
    out = []
    for name, pattern in layers.items():
        weight = get_weight(modules[name]).detach().float().contiguous()
        pruned = method.prune_group({name: weight}, None, {name: pattern}, options)[name]
        set_weight(modules[name], pruned)
        out.append(LayerResult(f"{prefix}.{name}", str(pattern), sparsity_of(pruned), pruned.numel()))
    return out


@contextmanager
def _ffn_in_chunks(adapter, block):
    """While pruning a block, run its FFN intermediate in token chunks where the family allows
    (yields the FFN module, or None where it does not)."""
    forward = adapter.ffn_in_chunks(block, CHUNK_TOKENS)
    if forward is None:
        yield None
        return
    module = block.get_submodule(adapter.ffn.module)
    with _forward_replaced(module, forward):
        yield module


@contextmanager
def _forward_replaced(module: nn.Module, forward):
    """``module`` runs ``forward`` inside the context; afterwards its own again, including a forward
    set on the instance before (accelerate's offloading hooks live there)."""
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous


def _prune_block(adapter, index, layers, method, options, hidden, calls, config, compute_dtype, model_dtype):
    block = adapter.blocks[index]
    prefix = adapter.block_prefix(index)
    modules = adapter.block_linears(block)
    if not layers:
        return [], _run_block(block, hidden, calls, compute_dtype, model_dtype), {}

    originals = {n: get_weight(modules[n]).detach().float().contiguous().clone() for n in layers}
    snapshot = None
    if compute_dtype is not None:
        snapshot = {k: v.detach().clone() for k, v in block.state_dict().items()}
        block.to(compute_dtype)

    groups = []
    joint = None
    if method.joint_ffn and config.iterations > 0 and adapter.ffn is not None:
        if all(name in layers for name in adapter.ffn.linears.values()):
            joint = _FFNPruner(adapter, block, layers, modules, originals, config, prefix)
        else:
            log.warning("%s: part of the FFN is skipped, so it is pruned layer by layer", prefix)
    for group in adapter.linear_groups:
        names = [n for n in group if n in layers and not (joint and n in joint.names)]
        if joint and group[0] == joint.names[0]:
            groups.append(joint)  # the FFN unit takes the place of its first group
        if names:
            groups.append(
                _GroupPruner(method, names, modules, {n: layers[n] for n in names}, originals, options,
                             method.stats_kind, prefix)
            )

    one_pass = len(hidden) == 1
    keywords = None
    if _branchwise_one_pass(adapter, config, len(hidden)):
        keywords = block_keywords(block, calls[0].args, calls[0].kwargs, len(hidden[0]))
    if keywords is not None:
        # the memory-lean path: the block branch by branch, a few windows at a time
        x = hidden[0] if compute_dtype is None else hidden[0].to(compute_dtype)
        hidden.clear()  # the input becomes the output in place; no second reference keeps it
        chunk_windows = max(1, CHUNK_TOKENS // x.shape[1])
        if compute_dtype is not None:
            keywords = _cast_floats(keywords, compute_dtype)
        out = prune_block_in_chunks(block, adapter.residual_branches, adapter.linear_names, x, keywords,
                                    groups, chunk_windows, keep_wide=keep_wide_inputs(method, config))
        outputs = [out.to(model_dtype)]
        del x, out
        return _finish_block(block, prefix, modules, groups, joint, snapshot, model_dtype, outputs)

    # a statistics pass (two passes, outputs of the pruned block propagated) needs nothing after
    # the last group's input: its hook ends the forward there
    stop_after_last = not one_pass and config.propagate == "pruned"

    def make_hook(pruner):
        def hook(module, args):
            if one_pass and pruner.pruned is not None:
                return  # already pruned in this pass (stays so)
            pruner.stats.add(args[0])
            if one_pass:
                pruner.prune()
            elif stop_after_last and pruner is groups[-1]:
                raise _StopForward
        return hook

    dense_outputs = None
    with _ffn_in_chunks(adapter, block) as ffn_module:
        if one_pass and config.propagate == "dense":
            dense_outputs = _run_block(block, hidden, calls, compute_dtype, model_dtype)
        # every member of a group reads the same tensor: hook the first one only; the FFN's input
        # group on the FFN module itself, which still receives every token at once
        ffn_inputs = (adapter.ffn.gate, adapter.ffn.up) if ffn_module is not None else ()
        handles = [(ffn_module if g.names[0] in ffn_inputs else modules[g.names[0]]).register_forward_pre_hook(
            make_hook(g)) for g in groups]
        try:
            outputs = _run_block(block, hidden, calls, compute_dtype, model_dtype, keep=not stop_after_last)
        finally:
            for h in handles:
                h.remove()
        if not one_pass:
            for g in groups:
                g.prune()
            dense_outputs = outputs if config.propagate == "dense" else None
            if config.propagate == "pruned":
                outputs = _run_block(block, hidden, calls, compute_dtype, model_dtype)
    return _finish_block(block, prefix, modules, groups, joint, snapshot, model_dtype,
                         dense_outputs if config.propagate == "dense" else outputs)


def _finish_block(block, prefix, modules, groups, joint, snapshot, model_dtype, outputs):
    """Check every group was pruned, restore the block's own dtype, and collect the results."""
    for g in groups:
        if g.pruned is None:
            raise ModelError(f"{prefix}.{g.names[0]} was never called in the block's forward: fix the adapter")

    if snapshot is not None:
        block.to(model_dtype)
        block.load_state_dict(snapshot)
        for g in groups:
            for name in g.names:
                set_weight(modules[name], g.pruned[name])
    results = [r for g in groups for r in g.results()]
    details = {f"{prefix}.ffn": joint.log} if joint is not None else {}
    return results, outputs, details
