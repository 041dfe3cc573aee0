"""Model loading: a local HF directory, a GGUF file (converted once to a cached
safetensors directory), a hub id already in the local cache, or an embedded default
(SmolLM2-135M for language modelling, MiniLM for classification).

Two tasks: "lm" (a causal language model) and "classify" (a sequence classifier:
the model's own head if it was saved as one, else a newly initialised head).
A directory whose ``sparseforge.json`` holds a "structure" manifest (compact or
physically smaller modules) is rebuilt from its config and that manifest, then its
safetensors weights are loaded strictly. So is a directory whose config.json announces
compressed sparse weights (``sparse_checkpoint``): they are decompressed to dense tensors."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

from .assets import cache_dir, embedded_encoder_dir, embedded_model_gguf
from .errors import ConfigError, ModelError, NotALanguageModel, first_line
from .export import METADATA_FILE
from .models import adapter_class, get_adapter
from .models.base import NEW_WEIGHTS_ATTR
from .models.modules import apply_config_overrides, apply_structure
from .options import DTYPES, TASKS
from .sparse_checkpoint import CONFIG_KEYS, announced_format, decompress_state, read_config

log = logging.getLogger(__name__)

#: dtype name -> torch dtype, for the names options.DTYPES offers
TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}
#: the source name of the embedded encoder (all-MiniLM-L6-v2); write "./encoder" for a directory of that name
ENCODER_SOURCE = "encoder"
#: single-file weights, then sharded indexes, in the order transformers prefers them
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
#: tokenizer files that are JSON: read here first, so a damaged one is named (transformers does not say which)
TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    except OSError as e:
        raise ModelError(f"cannot read GGUF file {path} ({e.strerror or first_line(e)}): check its permissions") from None
    return h.hexdigest()[:16]


def _gguf_error(gguf_path: Path, error: Exception) -> ModelError:
    """Why transformers could not read a GGUF file: a damaged file, or one it cannot convert."""
    try:
        from gguf import GGUFReader

        GGUFReader(gguf_path)  # slow, but only on this failure path
    except ImportError:
        pass
    except Exception as e:  # numpy and gguf raise ValueError, IndexError...: any means the file is unreadable
        return ModelError(f"cannot read GGUF file {gguf_path}: it is truncated or not GGUF ({first_line(e)}); "
                          "download or copy it again")
    return ModelError(f"cannot convert GGUF file {gguf_path} ({first_line(error)}): transformers cannot read this GGUF; "
                      "give the model as a Hugging Face directory instead")


def gguf_to_directory(gguf_path: Path) -> Path:
    """Dequantise a GGUF file once into a float32 safetensors directory in the cache; reuse it after."""
    target = cache_dir() / "models" / f"{gguf_path.stem}-{_file_digest(gguf_path)}"
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to %s (once)", gguf_path.name, target)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except ImportError as e:
        raise ModelError(f"reading GGUF needs the gguf package: pip install gguf ({e})") from None
    except Exception as e:
        raise _gguf_error(gguf_path, e) from None
    # the weights are plain float32 now; drop the quantizer so the model can be saved
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_model_dir(source: str | os.PathLike | None) -> tuple[str, dict]:
    """Turn a model source into something ``from_pretrained`` reads, with no network."""
    if source is None:
        return str(gguf_to_directory(embedded_model_gguf())), {}
    path = Path(source)
    if path.suffix == ".gguf":
        if path.is_dir():
            raise ModelError(f"{path} is a directory, not a GGUF file: give the .gguf file itself")
        if not path.is_file():
            raise ModelError(f"GGUF file {path} not found: check the path")
        return str(gguf_to_directory(path)), {}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a Hugging Face model directory (no config.json)")
        return str(path), {}
    if path.exists() or str(source).startswith((".", "/", "~")):
        raise ModelError(f"model {source} not found: give a local HF directory, a .gguf file or a cached hub id")
    return str(source), {"local_files_only": True}


def _read_json(path: Path, fix: str):
    """A JSON file's content; an unreadable, empty or malformed file is one ModelError naming it and ``fix``."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"cannot read {path} ({first_line(e)}): {fix}") from None
    if not text.strip():
        raise ModelError(f"{path} is empty: {fix}")
    try:
        return json.loads(text)
    except ValueError as e:
        raise ModelError(f"{path} is not valid JSON ({first_line(e)}): {fix}") from None


def _check_config(model_dir: Path) -> None:
    """config.json must be a JSON object naming a model_type; one transformers does not know at all is
    refused with sparseforge's supported families (AutoConfig's own message lists none)."""
    path = model_dir / "config.json"
    fix = "restore it from the original model or save the model again"
    config = _read_json(path, fix)
    if not isinstance(config, dict):
        raise ModelError(f"{path} is not a JSON object: {fix}")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ModelError(f"{path} has no \"model_type\": {fix}")
    if model_type not in CONFIG_MAPPING_NAMES:
        archs = config.get("architectures")
        adapter_class(model_type, archs[0] if isinstance(archs, list) and archs else None)


def _weight_files(model_dir: Path) -> list[Path]:
    """The weight files transformers would read from ``model_dir``; missing or unlisted ones are one ModelError."""
    for name in WEIGHT_FILES:
        if (model_dir / name).is_file():
            return [model_dir / name]
    for name in WEIGHT_INDEXES:
        index = model_dir / name
        if index.is_file():
            fix = "the model directory is damaged; copy or save the model again"
            weight_map = _read_json(index, fix)
            weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise ModelError(f"{index} has no \"weight_map\": {fix}")
            files = [model_dir / str(f) for f in sorted(set(weight_map.values()))]
            for path in files:
                if not path.is_file():
                    raise ModelError(f"weight file {path} listed in {index.name} is missing: the model directory is "
                                     "incomplete; copy the missing shards or save the model again")
            return files
    raise ModelError(f"{model_dir} has a config.json but no weights ({WEIGHT_FILES[0]}): the copy is incomplete; "
                     "copy the weight files too or save the model again")


def _check_safetensors(path: Path) -> None:
    """Read the header only (cheap): a truncated file no longer covers the sizes its header lists."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        raise ModelError(f"cannot read weight file {path}: it is truncated or damaged ({first_line(e)}); "
                         "copy it again or save the model again") from None


def _check_weights(model_dir: Path) -> None:
    for path in _weight_files(model_dir):
        if path.suffix == ".safetensors":
            _check_safetensors(path)


def _check_tokenizer_files(model_dir: Path) -> None:
    for name in TOKENIZER_JSON_FILES:
        if (model_dir / name).is_file():
            _read_json(model_dir / name, "the tokenizer is damaged; copy the tokenizer files from the original model")


def _load_tokenizer(name: str, extra: dict):
    if Path(name).is_dir():
        _check_tokenizer_files(Path(name))
    try:
        return AutoTokenizer.from_pretrained(name, **extra)
    except ImportError as e:
        raise ModelError(f"the tokenizer of {name} needs a package that is not installed ({first_line(e)}): "
                         "install it") from None
    except OSError as e:
        if extra.get("local_files_only"):
            raise  # load_model says the hub id is not cached
        raise ModelError(f"cannot read the tokenizer of {name} ({first_line(e)}): its tokenizer files are missing or "
                         "damaged; copy them from the original model") from None
    except Exception as e:  # tokenizers raises a plain Exception for a tokenizer.json it cannot parse
        raise ModelError(f"cannot read the tokenizer of {name} ({first_line(e)}): its tokenizer files are missing or "
                         "damaged; copy them from the original model") from None


def _is_classifier(config) -> bool:
    return any(str(a).endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or ()))


def _label_settings(num_labels: int | None, label_names: Sequence[str] | None) -> tuple[int | None, list[str] | None]:
    names = None
    if label_names is not None:
        if isinstance(label_names, str):
            raise ConfigError(f"label names '{label_names}' must be a list of names, not one string: split it")
        names = [str(n) for n in label_names]
        if len(names) < 2 or len(set(names)) != len(names):
            raise ConfigError(f"label names {names} must be at least two distinct names: fix the list")
        if num_labels is not None and num_labels != len(names):
            raise ConfigError(f"--num-labels {num_labels} disagrees with the {len(names)} label names: give one of them")
        num_labels = len(names)
    if num_labels is not None and (isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2):
        raise ConfigError(f"--num-labels {num_labels} must be an integer of at least 2 (one output would be regression)")
    return num_labels, names


def _model_class(config, task: str, name: str):
    """The Auto class for ``task``; every architecture/task mismatch is one ModelError line."""
    model_type = getattr(config, "model_type", None)
    archs = getattr(config, "architectures", None) or []
    if task == "classify":
        if model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
            raise ModelError("--task classify needs a model type with a sequence-classification head "
                             f"(e.g. bert, llama, opt, gpt2); {model_type} has none")
        adapter_class(model_type, archs[0] if archs else None)  # unsupported families fail before the load
        return AutoModelForSequenceClassification
    if _is_classifier(config):
        raise NotALanguageModel(f"{name} holds a sequence classifier ({archs[0]}), not a language model: load it with --task classify")
    adapter = adapter_class(model_type, archs[0] if archs else None)
    if not adapter.causal or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise NotALanguageModel(f"{name} is a {model_type} encoder with no causal language-model head: load it with --task classify")
    return AutoModelForCausalLM


def _set_labels(config, num_labels: int | None, names: list[str] | None, name: str) -> None:
    if _is_classifier(config) and num_labels is not None and num_labels != config.num_labels:
        raise ModelError(f"{name} has a {config.num_labels}-label classifier head, not {num_labels}: "
                         "omit --num-labels/--label-names to keep it, or start from the model it was trained from")
    if num_labels is not None:
        config.num_labels = num_labels
    if names is not None:
        config.id2label = dict(enumerate(names))
        config.label2id = {n: i for i, n in enumerate(names)}


def _set_pad_token(config, tokenizer, name: str) -> None:
    """Decoder classifiers pool the last non-pad token: they need config.pad_token_id for batches."""
    if getattr(config, "pad_token_id", None) is not None:
        return
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ModelError(f"the tokenizer of {name} has neither a pad nor an eos token; classifying batches needs one: "
                         "add a pad token to the tokenizer")
    config.pad_token_id = pad
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


@contextmanager
def _quiet_load_report():
    """transformers logs a multi-line table of missing/unexpected keys; we log one line instead."""
    logger = logging.getLogger("transformers.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _keys(keys, limit: int = 6) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _is_head_key(model, key: str) -> bool:
    prefix = getattr(model, "base_model_prefix", "")
    return not (prefix and key.startswith(prefix + "."))


def _mark_new_weights(model, keys) -> None:
    """Record the randomly initialised weights (a new classifier head): they are not part of the model
    that was loaded, so a resumed run's fingerprint of its starting model leaves them out."""
    setattr(model, NEW_WEIGHTS_ATTR, frozenset(keys))


def _report_load(model, info: dict, name: str, task: str) -> None:
    mismatched = info.get("mismatched_keys") or set()
    if mismatched:
        shown = [f"{k} {tuple(a)} vs {tuple(b)}" for k, a, b in sorted(mismatched, key=lambda m: m[0])]
        raise ModelError(f"the weights in {name} do not match its config.json ({_keys(shown, 3)}): a model with "
                         f"compact or shrunk layers needs the \"structure\" manifest of its {METADATA_FILE}; save it with sparseforge")
    missing, unexpected = set(info.get("missing_keys") or ()), set(info.get("unexpected_keys") or ())
    _mark_new_weights(model, missing)
    head = {k for k in missing if _is_head_key(model, k)} if task == "classify" else set()
    if head:
        log.info("newly initialised classifier head (%d labels): %s", model.config.num_labels, _keys(head))
    if missing - head:
        log.warning("%d weights missing from %s, newly initialised: %s", len(missing - head), name, _keys(missing - head))
    if unexpected:
        log.info("ignored %d weights of %s that the %s model does not use: %s", len(unexpected), name, task, _keys(unexpected))


def _structure_manifest(name: str) -> dict | None:
    meta_path = Path(name) / METADATA_FILE
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {meta_path} ({first_line(e)}): fix the file or delete it") from None
    manifest = meta.get("structure") if isinstance(meta, dict) else None
    if not manifest:
        return None
    if not isinstance(manifest, dict):
        raise ModelError(f"the \"structure\" of {meta_path} is not a mapping: the file is damaged; save the model again")
    return manifest if manifest.get("modules") or manifest.get("config") else None


def _read_safetensors(model_dir: Path, origins: dict | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's safetensors; ``origins`` (if given) receives key -> file."""
    from safetensors.torch import load_file

    single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelError(f"cannot read {index} ({first_line(e)}): the model directory is damaged; save it again") from None
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
    else:
        raise ModelError(f"{model_dir} has no model.safetensors (nor its index): a structured model loads from safetensors "
                         "only; save it again with sparseforge")
    state = {}
    for path in files:
        if not path.is_file():
            raise ModelError(f"weight file {path} is missing: the model directory is incomplete; copy or save it again")
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as e:
            raise ModelError(f"cannot read weight file {path}: it is truncated or damaged ({first_line(e)}); "
                             "copy it again or save the model again") from None
        state.update(tensors)
        if origins is not None:
            origins.update(dict.fromkeys(tensors, path))
    return state


def _load_structured(model_cls, name: str, config, manifest: dict | None, dtype: torch.dtype, task: str,
                     sparse: str | None = None):
    """Build from the config, put the recorded modules in (if a ``manifest``), decompress the ``sparse``
    weights (if a format is announced), load the weights strictly (tied keys excepted).

    The skeleton's parameters live on the meta device (its buffers, e.g. rotary tables, are real) and
    the file's tensors become the parameters (``assign``): a shrunk model never materialises its
    original full shapes nor holds its weights twice, so loading peaks near the saved model's size.
    """
    from accelerate import init_empty_weights

    new_head = task == "classify" and not _is_classifier(config)  # a saved language model gets a new classifier head
    rebuilt = f"its {METADATA_FILE} structure" if manifest is not None else "its config.json"
    if manifest is not None:
        apply_config_overrides(config, manifest)
    for key in CONFIG_KEYS:  # the weights are dense once decompressed; a later save must not announce compression
        if hasattr(config, key):
            delattr(config, key)
    with init_empty_weights(include_buffers=False):
        model = model_cls.from_config(config, dtype=dtype)
        if manifest is not None:
            apply_structure(model, manifest, dtype)
    origins: dict[str, Path] = {}
    state = _read_safetensors(Path(name), origins)
    tensors = model.state_dict(keep_vars=True)
    if sparse is not None:
        state = decompress_state(state, sparse, {k: v.shape for k, v in tensors.items()}, origins, Path(name))
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(tensors[k].shape)}" for k, v in state.items()
             if k in tensors and v.shape != tensors[k].shape]
    if wrong:
        raise ModelError(f"the weights in {name} do not fit the model rebuilt from {rebuilt} "
                         f"({_keys(wrong, 3)}): the weights and the {_source(manifest)} disagree; save the model again")
    for key, value in state.items():  # the dtype asked for (the skeleton's, fp32-kept modules included), one at a time
        if key in tensors and value.is_floating_point() and value.dtype != tensors[key].dtype:
            state[key] = value.to(tensors[key].dtype)
    result = model.load_state_dict(state, strict=False, assign=True)
    del state, tensors
    model.tie_weights()
    missing, unexpected = set(result.missing_keys), set(result.unexpected_keys)
    tensors = model.state_dict(keep_vars=True)
    loaded = set(tensors) - missing
    missing = {k for k in missing if not any(tensors[j] is tensors[k] for j in loaded)}  # tied to a loaded tensor: fine
    head = {k for k in missing if _is_head_key(model, k)} if new_head else set()
    if new_head:
        unexpected = {k for k in unexpected if not _is_head_key(model, k)}  # the language-model head, unused
    if missing - head or unexpected:
        parts = ([f"missing {_keys(missing - head)}"] if missing - head else []) + \
                ([f"unexpected {_keys(unexpected)}"] if unexpected else [])
        raise ModelError(f"the weights in {name} do not fit the model rebuilt from {rebuilt} "
                         f"({'; '.join(parts)}): the weights and the {_source(manifest)} disagree; save the model again")
    if head:
        log.info("newly initialised classifier head (%d labels): %s", model.config.num_labels, _keys(head))
        for module_name in sorted({k.rpartition(".")[0] for k in head}):
            module = model.get_submodule(module_name)
            module.to_empty(device="cpu", recurse=False)
            model._init_weights(module)
    _mark_new_weights(model, head)
    empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        raise ModelError(f"the model rebuilt from {rebuilt} of {name} has no values for "
                         f"{_keys(empty)}: the weights and the {_source(manifest)} disagree; save the model again")
    return model


def _source(manifest: dict | None) -> str:
    return "manifest" if manifest is not None else "config"


_LOAD_FIX = "check that it is a complete Hugging Face model directory, or save the model again"


def load_model(source: str | os.PathLike | None = None, dtype: str = "float32", task: str | None = None,
               num_labels: int | None = None, label_names: Sequence[str] | None = None):
    """Load ``(model, tokenizer)``.

    source: a local HF directory, a ``.gguf`` file, a hub id in the local cache,
        "encoder" (the embedded all-MiniLM-L6-v2 BERT encoder) or None (the embedded
        SmolLM2-135M for task "lm", the embedded encoder for task "classify").
    task: "lm" (causal language model), "classify" (sequence classifier) or None:
        inferred from the saved ``architectures`` (…ForSequenceClassification ->
        classify, else lm); "encoder" and given labels mean classify.
    num_labels, label_names: the classifier's outputs (label names set id2label /
        label2id). A head that the checkpoint lacks is newly initialised: seed first.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype '{dtype}' unknown: choose from {', '.join(DTYPES)}")
    if task is not None and task not in TASKS:
        raise ConfigError(f"task '{task}' unknown: choose from {', '.join(TASKS)}")
    num_labels, names = _label_settings(num_labels, label_names)
    if num_labels is not None:
        if task == "lm":
            raise ConfigError("--num-labels/--label-names are for --task classify; drop them or change the task")
        task = "classify"
    if isinstance(source, str) and source == ENCODER_SOURCE:
        name, extra = str(embedded_encoder_dir()), {}
        task = task or "classify"
    elif source is None and task == "classify":
        name, extra = str(embedded_encoder_dir()), {}
    else:
        name, extra = resolve_model_dir(source)
    local = Path(name).is_dir()
    if local:
        _check_config(Path(name))
    try:
        config = AutoConfig.from_pretrained(name, **extra)
        task = task or ("classify" if _is_classifier(config) else "lm")
        model_cls = _model_class(config, task, name)  # the architecture is judged before the files are read
        if local:
            _check_weights(Path(name))
        tokenizer = _load_tokenizer(name, extra)
        if task == "classify":
            _set_labels(config, num_labels, names, name)
            if adapter_class(config.model_type).causal:
                _set_pad_token(config, tokenizer, name)
        manifest = _structure_manifest(name) if local else None
        sparse = announced_format(read_config(Path(name)), Path(name)) if local else None
        if manifest is not None or sparse is not None:
            model = _load_structured(model_cls, name, config, manifest, TORCH_DTYPES[dtype], task, sparse)
        else:
            with _quiet_load_report():
                model, info = model_cls.from_pretrained(name, config=config, dtype=TORCH_DTYPES[dtype], ignore_mismatched_sizes=True,
                                                        output_loading_info=True, **extra)
            _report_load(model, info, name, task)
    except OSError as e:
        if extra.get("local_files_only"):
            raise ModelError(
                f"hub id '{source}' is not in the local Hugging Face cache and there is no network: "
                "download it where there is (`hf download ...`) or pass a local directory"
            ) from None
        raise ModelError(f"cannot load model from {name} ({first_line(e)}): {_LOAD_FIX}") from None
    except SafetensorError as e:  # a weight file damaged past its header (the header was checked before)
        raise ModelError(f"cannot read the weights of {name}: a weight file is truncated or damaged ({first_line(e)}); "
                         "copy the model again or save it again") from None
    except (ValueError, RuntimeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ModelError(f"cannot load model from {name} ({first_line(e)}): {_LOAD_FIX}") from None
    get_adapter(model)  # unsupported architectures fail here, before any work
    model.eval()
    return model, tokenizer
