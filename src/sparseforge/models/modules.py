"""Module surgery in one place: list a model's block linears, replace a module, and
record / rebuild the modules whose shapes differ from what the model's config builds.

Structured methods leave modules that ``from_pretrained`` cannot rebuild from
``config.json`` alone: a compact LoSparse layer (U, V and a sparse S instead of one
weight), a physically smaller Linear. Such a module describes itself with
``structure() -> dict`` (JSON, with ``"class"``: a name registered in
``STRUCTURE_CLASSES``) and its class rebuilds an empty module of the same shapes with
the classmethod ``from_structure(structure, dtype)``. ``structure_manifest(model)``
collects these descriptions (saved in ``sparseforge.json`` under ``"structure"``) and
``apply_structure(model, manifest, dtype)`` puts empty modules of the recorded shapes
back into a model built from its config, so the saved state dict loads into it.

Classes are found through a whitelist (``STRUCTURE_CLASSES``: name -> "module:attr"),
never by importing a string read from a checkpoint.

A plain ``nn.Linear`` needs no method: its structure is
``{"class": "Linear", "in_features": ..., "out_features": ..., "bias": ...}`` and this
module builds it (``linear_structure``; pass its name in ``include`` to
``structure_manifest``, e.g. a layer that structured pruning shrank).
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..errors import ConfigError, ModelError, first_line
from .base import ReparametrisedLinear, is_reparametrised
from .families import get_adapter

log = logging.getLogger(__name__)

#: structure class name -> "importable.module:attribute"; extend with register_structure_class
STRUCTURE_CLASSES: dict[str, str] = {
    "CompactLoSparseLinear": "sparseforge.lowrank.layers:CompactLoSparseLinear",
    "Linear": "torch.nn:Linear",
    # TranSpa's free layout and shrunk GPT-2 layers: listed here so loading needs no earlier import
    "CompactAttention": "sparseforge.structured.attention:CompactAttention",
    "Conv1D": "sparseforge.structured.surgery:StructuredConv1D",
}


def replace_module(model: nn.Module, full_name: str, new_module: nn.Module) -> nn.Module:
    """Put ``new_module`` at ``full_name`` (as ``named_modules()`` spells it); return the module it replaces.

    The new module takes the old one's training mode; its device and dtype are the caller's.
    """
    if not isinstance(new_module, nn.Module):
        raise ModelError(f"cannot put a {type(new_module).__name__} at '{full_name}': pass an nn.Module")
    parent_name, _, child = full_name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        parent = None
    old = parent._modules.get(child) if parent is not None and child else None
    if old is None:
        raise ModelError(f"no module '{full_name}' in {type(model).__name__} to replace: "
                         "give a full name as model.named_modules() lists it (e.g. 'model.layers.0.mlp.up_proj')")
    new_module.train(old.training)
    setattr(parent, child, new_module)
    return old


def block_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Full name -> module of every linear layer of every block, blocks in order, layers in the adapter's order."""
    adapter = get_adapter(model)
    return {f"{adapter.block_prefix(index)}.{name}": module
            for index, block in enumerate(adapter.blocks)
            for name, module in adapter.block_linears(block).items()}


# --- structure registry ---------------------------------------------------------------------------------------


def register_structure_class(name: str, import_path: str) -> None:
    """Allow ``structure()["class"] == name`` in manifests; ``import_path`` is "module:attribute"."""
    module_name, sep, attr = import_path.partition(":")
    if not name or not sep or not module_name or not attr:
        raise ConfigError(f"structure class import path '{import_path}' is malformed: write it as 'package.module:ClassName'")
    known = STRUCTURE_CLASSES.get(name)
    if known is not None and known != import_path:
        raise ConfigError(f"structure class '{name}' is already registered as {known}: register yours under another name")
    STRUCTURE_CLASSES[name] = import_path


def structure_class(name: str) -> type[nn.Module]:
    """The class a structure ``"class"`` name stands for (whitelisted names only)."""
    import_path = STRUCTURE_CLASSES.get(name) if isinstance(name, str) else None
    if import_path is None:
        raise ModelError(f"structure class {name!r} is not registered (known: {', '.join(sorted(STRUCTURE_CLASSES))}): "
                         "call sparseforge.models.modules.register_structure_class for it, or upgrade sparseforge")
    module_name, _, attr = import_path.partition(":")
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ModelError(f"structure class '{name}' ({import_path}) cannot be imported ({e}): "
                         "install the sparseforge version that saved this model") from None
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ModelError(f"structure class '{name}' ({import_path}) is not an nn.Module class: fix its registration")
    if not hasattr(obj, "from_structure") and not issubclass(obj, nn.Linear):
        raise ModelError(f"structure class '{name}' ({import_path}) has no from_structure(structure, dtype) classmethod: add one")
    return obj


def linear_structure(module: nn.Linear) -> dict:
    """The structure of a plain (possibly shrunk) Linear."""
    return {"class": "Linear", "in_features": module.in_features, "out_features": module.out_features,
            "bias": module.bias is not None}


def module_structure(module: nn.Module) -> dict | None:
    """``module.structure()`` if it has one, a plain Linear's shapes, else None."""
    if callable(getattr(module, "structure", None)):
        return module.structure()
    if type(module) is nn.Linear:
        return linear_structure(module)
    return None


def module_from_structure(structure: Mapping, dtype: torch.dtype | None = None) -> nn.Module:
    """An empty module (right shapes, arbitrary values) for one structure description."""
    if not isinstance(structure, Mapping) or "class" not in structure:
        raise ModelError(f"structure entry {structure!r} has no \"class\": the sparseforge.json is damaged; save the model again")
    cls = structure_class(structure["class"])
    if hasattr(cls, "from_structure"):
        module = cls.from_structure(dict(structure), dtype)
    else:  # a plain Linear
        try:
            module = cls(int(structure["in_features"]), int(structure["out_features"]), bias=bool(structure["bias"]),
                         dtype=dtype)
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"structure {dict(structure)} of a Linear needs integer in_features, out_features and a bias "
                             "flag: the sparseforge.json is damaged; save the model again") from None
    if not isinstance(module, nn.Module):
        raise ModelError(f"{cls.__name__}.from_structure returned a {type(module).__name__}, not an nn.Module: fix it")
    return module


def _checked_structure(name: str, module: nn.Module) -> dict:
    structure = module_structure(module)
    if not isinstance(structure, dict) or not isinstance(structure.get("class"), str):
        raise ModelError(f"{type(module).__name__}.structure() at '{name}' must return a dict with a \"class\" name: fix it")
    structure_class(structure["class"])  # registered and rebuildable: fail at save time, not at load time
    try:
        json.dumps(structure)
    except (TypeError, ValueError):
        raise ModelError(f"{type(module).__name__}.structure() at '{name}' is not JSON: return plain numbers, "
                         "strings and lists") from None
    return structure


def structure_manifest(model: nn.Module, include: Iterable[str] = ()) -> dict:
    """``{"modules": {full name: structure}, "config": {}}`` for every module with ``structure()``
    plus the modules named in ``include`` (e.g. shrunk plain Linears). A structured module rebuilds
    its plain children; a structured module inside another (LoSparse factors as a projection of
    compact attention) is recorded after it and rebuilt in its place. ``"config"`` holds config
    overrides to apply before the model is built (none yet)."""
    modules: dict[str, dict] = {}
    for name, module in model.named_modules():
        if callable(getattr(module, "structure", None)):
            if not name:
                raise ModelError(f"{type(model).__name__} itself has structure(): only its submodules can be rebuilt")
            modules[name] = _checked_structure(name, module)
    for name in include:
        if name in modules:
            continue
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ModelError(f"no module '{name}' in {type(model).__name__} to record: give a full name as "
                             "model.named_modules() lists it") from None
        if module_structure(module) is None:
            raise ModelError(f"'{name}' is a {type(module).__name__}, which has no structure(): add one, or record only "
                             "plain Linears and structured modules")
        modules[name] = _checked_structure(name, module)
    return {"modules": modules, "config": {}}


def model_structure(model: nn.Module, config_overrides: Mapping | None = None) -> dict | None:
    """The manifest a saved copy of ``model`` needs to load, found from the model alone (None if the
    config rebuilds it as it is): every structured module, and every plain Linear whose shape differs
    from the one the config builds (a FFN that structured pruning narrowed). The config's shapes come
    from a copy built on the meta device (no memory, no initialisation); where the config cannot build
    one, every plain block Linear outside a structured module is recorded (an unchanged one costs
    nothing; the head is never replaced, which would untie it from the embeddings).
    ``config_overrides`` are kept as the manifest's ``"config"``."""
    structured = tuple(name + "." for name, m in model.named_modules() if callable(getattr(m, "structure", None)))
    reference = _config_built_modules(model)
    # without the config's shapes to compare with: every plain block linear (never the head: it would untie)
    candidates = _known_block_linears(model) if reference is None else dict(model.named_modules())
    narrowed = [name for name, module in candidates.items()
                if type(module) is nn.Linear and not name.startswith(structured)
                and (reference is None or _differs(module, reference.get(name)))]
    manifest = structure_manifest(model, include=narrowed)
    if config_overrides:
        manifest["config"] = dict(config_overrides)
    return manifest if manifest["modules"] or manifest["config"] else None


def _differs(module: nn.Linear, stock: nn.Module | None) -> bool:
    """A Linear whose shape or bias differs from the config-built one at its place (none there: no change known)."""
    return isinstance(stock, nn.Linear) and (stock.weight.shape != module.weight.shape
                                             or (stock.bias is None) != (module.bias is None))


def _known_block_linears(model: nn.Module) -> dict[str, nn.Module]:
    try:
        return block_linears(model)
    except ModelError:  # a family without an adapter: no block linears known
        return {}


def _config_built_modules(model: nn.Module) -> dict[str, nn.Module] | None:
    """``named_modules()`` of the model its config builds, on the meta device; None if it cannot be built."""
    import copy

    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the family's init notes were shown when the model was made
    try:
        with torch.device("meta"):
            return dict(type(model)(copy.deepcopy(model.config)).named_modules())
    except Exception as e:  # noqa: BLE001 - any model class: a failed build only means no shapes to compare
        log.warning("cannot build %s from its config to compare shapes (%s): every plain block Linear is recorded",
                    type(model).__name__, first_line(e))
        return None
    finally:
        hf_logging.set_verbosity(verbosity)


def _manifest_modules(manifest: Mapping) -> Mapping:
    modules = manifest.get("modules") if isinstance(manifest, Mapping) else None
    if not isinstance(modules, Mapping):
        raise ModelError("the structure manifest has no \"modules\" mapping: the sparseforge.json is damaged; save the model again")
    return modules


def apply_config_overrides(config, manifest: Mapping) -> None:
    """Set the manifest's ``"config"`` overrides on a model config (before the model is built from it)."""
    _manifest_modules(manifest)
    overrides = manifest.get("config") or {}
    if not isinstance(overrides, Mapping):
        raise ModelError("the structure manifest's \"config\" is not a mapping: the sparseforge.json is damaged; save the model again")
    for key, value in overrides.items():
        setattr(config, key, value)


def apply_structure(model: nn.Module, manifest: Mapping, dtype: torch.dtype | None = None) -> list[str]:
    """Replace every module the manifest names by an empty one of the recorded structure; return the names.

    ``dtype`` defaults to the model's (first parameter's) dtype. The new modules hold
    arbitrary values until a state dict is loaded.
    """
    modules = _manifest_modules(manifest)
    if dtype is None:
        dtype = next(model.parameters()).dtype
    for name, structure in modules.items():
        replace_module(model, name, module_from_structure(structure, dtype))
    return list(modules)


__all__ = [
    "STRUCTURE_CLASSES",
    "ReparametrisedLinear",
    "apply_config_overrides",
    "apply_structure",
    "block_linears",
    "is_reparametrised",
    "linear_structure",
    "module_from_structure",
    "model_structure",
    "module_structure",
    "register_structure_class",
    "replace_module",
    "structure_class",
    "structure_manifest",
]
