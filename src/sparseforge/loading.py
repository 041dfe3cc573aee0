"""Model loading: a local HF directory, a GGUF file (converted once to a cached
safetensors directory), a hub id already in the local cache, or the embedded default."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .assets import cache_dir, embedded_model_gguf
from .errors import ConfigError, ModelError
from .models import get_adapter

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


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
        raise ModelError(f"cannot read GGUF file {gguf_path}: {e}") from None
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


def load_model(source: str | os.PathLike | None = None, dtype: str = "float32"):
    """Load ``(model, tokenizer)`` for pruning. ``source=None`` is the embedded SmolLM2-135M."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype '{dtype}' unknown: choose from {', '.join(DTYPES)}")
    name, extra = resolve_model_dir(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=DTYPES[dtype], **extra)
        tokenizer = AutoTokenizer.from_pretrained(name, **extra)
    except OSError as e:
        if extra.get("local_files_only"):
            raise ModelError(
                f"hub id '{source}' is not in the local Hugging Face cache and there is no network: "
                "download it where there is (`hf download ...`) or pass a local directory"
            ) from None
        raise ModelError(f"cannot load model from {name}: {e}") from None
    except ValueError as e:
        raise ModelError(f"cannot load model from {name}: {e}") from None
    get_adapter(model)  # unsupported architectures fail here, before any work
    model.eval()
    return model, tokenizer
