"""The method index: every method sparseforge implements, by name.

One table says what kind each method is (one-shot pruning, recovery
fine-tuning after pruning, or compression during training), what it does in
a line, and its defaults. The CLI builds its choices and help from it; the
API modules read their defaults from it. Nothing else lists method names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ConfigError

ONE_SHOT = "one-shot"
RECOVERY = "recovery"
TRAIN_TIME = "train-time"
KINDS = (ONE_SHOT, RECOVERY, TRAIN_TIME)


@dataclass(frozen=True)
class MethodInfo:
    name: str
    kind: str
    summary: str
    #: defaults that differ between methods of one kind (e.g. the learning rate)
    defaults: dict = field(default_factory=dict)
    #: train-time methods: "module:function" building the method object, ``build(name, steps, options)``;
    #: baselines share their family's entry point (itp and lowrank are LoSparse's, structured-l1 and tsvd TranSpa's)
    entry: str | None = None


_LOSPARSE = "sparseforge.lowrank.method:build_method"
#: train-time learning rates by task. Classification at short budgets (MiniLM / wiki-topics, 120 steps): 5e-4
#: beat 1e-4 for dense fine-tuning (85.4 vs 80.6% accuracy), LoSparse (keep 20%: 78.0 vs 58.6) and ITP
#: (77.1 vs 57.2), but not for the pure low-rank baseline (30.1 vs 41.4), which keeps 1e-4
_TRAIN_LR = {"lr": 1e-4, "lr_classify": 5e-4}
_TRANSPA = "sparseforge.structured.method:build_method"

_ALL = (
    MethodInfo("magnitude", ONE_SHOT, "smallest |W| per layer; needs no data"),
    MethodInfo("wanda", ONE_SHOT, "|W| x input norm, per output row; no update"),
    MethodInfo("sparsegpt", ONE_SHOT, "OBS mask + weight update from X X^T"),
    MethodInfo("sparsellm", ONE_SHOT, "FFNs pruned jointly (auxiliary variables), rest SparseGPT"),
    MethodInfo("spp", RECOVERY, "sparsity-preserving adapters: W + A*beta*W keeps every zero", {"lr": 3.6e-2}),
    MethodInfo("lora-star", RECOVERY, "LoRA merged, then the original zero pattern re-applied", {"lr": 9e-3}),
    MethodInfo("lora", RECOVERY, "plain LoRA merged (fills the zeros in; shown for comparison)", {"lr": 9e-3}),
    MethodInfo("losparse", TRAIN_TIME, "W = U V + S, S's output rows pruned by sensitivity on a cubic schedule",
               _TRAIN_LR, entry=_LOSPARSE),
    MethodInfo("itp", TRAIN_TIME, "the same scores and schedule on the rows of W itself (no low-rank part)",
               _TRAIN_LR, entry=_LOSPARSE),
    MethodInfo("lowrank", TRAIN_TIME, "U V only, the rank chosen to spend the same budget", {"lr": 1e-4},
               entry=_LOSPARSE),
    MethodInfo("transpa", TRAIN_TIME, "coupled Fisher importance + coupled L1 removal: physically smaller layers",
               _TRAIN_LR, entry=_TRANSPA),
    MethodInfo("structured-l1", TRAIN_TIME,
               "uncoupled: each matrix's rows/columns by their own L1 norm, same trajectory", _TRAIN_LR,
               entry=_TRANSPA),
    MethodInfo("tsvd", TRAIN_TIME, "truncated SVD of each coupled product, same trajectory (the paper's ablation)",
               _TRAIN_LR, entry=_TRANSPA),
    MethodInfo("dense", TRAIN_TIME, "plain fine-tuning of every weight (the quality ceiling)", _TRAIN_LR,
               entry="sparseforge.training:build_dense"),
)

METHODS: dict[str, MethodInfo] = {m.name: m for m in _ALL}


def method_names(kind: str | None = None) -> list[str]:
    """Names of the methods of one kind (all if None), in the index's order."""
    return [m.name for m in _ALL if kind is None or m.kind == kind]


def get_method_info(name: str, kind: str | None = None) -> MethodInfo:
    """The index entry of ``name``; with ``kind``, it must be of that kind."""
    info = METHODS.get(name)
    if info is None or (kind is not None and info.kind != kind):
        kind_text = f" ({kind})" if kind else ""
        raise ConfigError(f"unknown method '{name}'{kind_text}: choose one of {', '.join(method_names(kind))}")
    return info


def train_family(name: str) -> str:
    """The family of a train-time method, by its entry point: "losparse" (losparse, itp, lowrank), "transpa"
    (transpa, structured-l1, tsvd) or "dense"."""
    entry = get_method_info(name, TRAIN_TIME).entry or ""
    return {_LOSPARSE: "losparse", _TRANSPA: "transpa"}.get(entry, "dense")


def build_train_method(name: str, steps: int, options: dict | None = None):
    """The method object of a train-time method (prepare / callbacks / finish), from its entry point."""
    import importlib

    info = get_method_info(name, TRAIN_TIME)
    module, _, function = info.entry.partition(":")
    return getattr(importlib.import_module(module), function)(name, steps, dict(options or {}))


def default_lr(name: str, task: str = "lm") -> float:
    """The learning rate a method trains with when none is given (for ``task``, where it differs)."""
    defaults = get_method_info(name).defaults
    return defaults.get(f"lr_{task}", defaults["lr"])


def methods_help(kind: str) -> str:
    """'a | b | c' with one-line summaries, for CLI help."""
    return "; ".join(f"{m.name}: {m.summary}" for m in _ALL if m.kind == kind)
