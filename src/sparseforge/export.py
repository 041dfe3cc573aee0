"""Saving pruned models as plain HF directories plus ``sparseforge.json``, atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ConfigError, ModelError

METADATA_FILE = "sparseforge.json"


def check_output(output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail early, before any slow work, if ``output_dir`` cannot be written as asked."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} exists and is a file: choose a directory path for --output")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"output directory {out} exists and is not empty: choose another --output or pass --overwrite")
    return out


def save(model, tokenizer, output_dir: str | os.PathLike, metadata: dict | None = None, overwrite: bool = False,
         extra_files: dict | None = None) -> Path:
    """Write ``model`` (zeros in its weights), its tokenizer and ``metadata`` to ``output_dir``.

    ``extra_files`` maps file names to functions that write that file, given its path.

    Everything is written to a temporary sibling directory first and renamed into
    place at the end, so an interrupted run leaves no half-written output.
    """
    out = check_output(output_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata or {}, indent=2) + "\n")
        for name, write in (extra_files or {}).items():
            write(tmp / name)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_metadata(model_dir: str | os.PathLike) -> dict:
    """The ``sparseforge.json`` of a saved model ({} if it has none)."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelError(f"model directory {path} not found: check the path")
    meta = path / METADATA_FILE
    return json.loads(meta.read_text()) if meta.is_file() else {}
