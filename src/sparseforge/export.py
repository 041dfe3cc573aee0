"""Saving pruned models as plain HF directories plus ``sparseforge.json``, atomically.

``save`` writes into a temporary sibling ``.NAME.tmp-<pid>-XXXX`` and renames it into place; with
overwrite it first moves the old output into ``.NAME.old-<pid>-XXXX``. A process killed outright
(SIGKILL, power loss) leaves those siblings behind, so every save of an output (and ``check_output``)
first removes the ones whose writer is no longer alive, and puts an old output back if the kill
landed between the two renames.

``save_format="sparse-bitmask"`` stores the pruned block linears as compressed tensors
(``sparse_checkpoint``): a smaller directory that ``sparseforge.load_model`` reads and vanilla
transformers does not; ``export_model`` converts a saved directory either way.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .errors import ConfigError, ModelError, first_line
from .options import DTYPES

log = logging.getLogger(__name__)

METADATA_FILE = "sparseforge.json"
#: how weights are written: plain dense safetensors, or the pruned block linears as compressed tensors
SAVE_FORMATS = ("dense", "sparse-bitmask")


# ---------------------------------------------------------------- what interrupted saves left behind


def _sibling_prefix(out: Path, stage: str) -> str:
    """``stage`` is "tmp" (the new output being written) or "old" (the output being replaced)."""
    return f".{out.name}.{stage}-"


def _writer_pid(name: str, prefix: str) -> int | None:
    """The PID in a sibling's name; None for a name without one (written before names carried it)."""
    match = re.fullmatch(r"(\d+)-.+", name[len(prefix):])
    return int(match.group(1)) if match else None


def _alive(pid: int | None) -> bool:
    if pid is None or pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _stale_siblings(out: Path, stage: str) -> list[Path]:
    prefix = _sibling_prefix(out, stage)
    try:
        names = [p for p in out.parent.iterdir() if p.name.startswith(prefix)]  # not glob: names may hold [ or *
    except OSError:
        return []
    return sorted(p for p in names if not _alive(_writer_pid(p.name, prefix)))


def clean_stale(output_dir: str | os.PathLike) -> None:
    """Remove the temporaries of interrupted saves of ``output_dir`` whose writer is gone; if the
    output itself is missing and one holds the old output, that is put back (a kill between the renames)."""
    out = Path(output_dir)
    for old in _stale_siblings(out, "old"):
        kept = old / out.name
        if kept.is_dir() and not out.exists() and not out.is_symlink():
            try:
                os.replace(kept, out)
            except OSError as e:
                raise ConfigError(f"cannot restore {out} from {old} ({e.strerror or first_line(e)}), left by an "
                                  f"interrupted save: move {kept} back to {out} by hand") from None
            log.warning("restored %s from %s, left by an interrupted save", out, old)
        else:
            log.warning("removing %s, left by an interrupted save of %s", old, out)
        shutil.rmtree(old, ignore_errors=True)
    for tmp in _stale_siblings(out, "tmp"):
        log.warning("removing %s, left by an interrupted save of %s", tmp, out)
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- checks before any slow work


def _check_not_input(out: Path, inputs: Iterable) -> None:
    """The output must not be, hold or sit inside an input model: --overwrite would replace or delete it."""
    target = out.resolve()
    for source in inputs:
        if source is None or not Path(source).exists():  # a hub id or the embedded model: not a path here
            continue
        model = Path(source).resolve()
        if target == model:
            raise ConfigError(f"--output {out} is the input model: choose another directory; "
                              "--overwrite would replace your model")
        if target in model.parents:
            raise ConfigError(f"--output {out} contains the input model {source}: choose another directory; "
                              "--overwrite would delete your model")
        if model in target.parents:
            raise ConfigError(f"--output {out} is inside the input model {source}: choose a directory outside it")


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    return next(p for p in (path, *path.parents) if p.exists())


def _check_parent(out: Path, flag: str = "--output") -> None:
    """The directory the output is created in (or its nearest existing ancestor) must be a writable directory."""
    ancestor = _nearest_existing(out.absolute().parent)
    if not ancestor.is_dir():
        raise ConfigError(f"{flag} {out} cannot be created: {ancestor} is a file, not a directory; "
                          f"choose another {flag}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {out} cannot be written: directory {ancestor} is not writable; "
                          f"choose another {flag} or fix its permissions")


def check_output(output_dir: str | os.PathLike, overwrite: bool = False, inputs: Iterable = ()) -> Path:
    """Fail early, before any slow work, if ``output_dir`` cannot be written as asked.

    ``inputs``: the input model paths (None and hub ids are skipped): the output may not be one of
    them, inside one or hold one. Also removes what interrupted saves of this output left behind.
    """
    out = Path(output_dir)
    _check_not_input(out, inputs)
    _check_parent(out)
    clean_stale(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} exists and is a file: choose a directory path for --output")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"output directory {out} exists and is not empty: choose another --output or pass --overwrite")
    return out


def check_json_path(path: str | os.PathLike | None) -> Path | None:
    """Fail early if ``--json FILE`` cannot be written; None and "-" (standard output) pass."""
    if path is None or str(path) == "-":
        return None
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"--json {target} is a directory: give a file path, e.g. {target / 'results.json'}")
    parent = target.absolute().parent
    ancestor = _nearest_existing(parent)
    if not ancestor.is_dir():
        raise ConfigError(f"--json {target} cannot be written: {ancestor} is a file, not a directory; "
                          "choose another path")
    if ancestor != parent:
        raise ConfigError(f"--json {target} cannot be written: directory {parent} does not exist; "
                          "create it or choose another path")
    writable = os.access(target, os.W_OK) if target.exists() else os.access(parent, os.W_OK | os.X_OK)
    if not writable:
        raise ConfigError(f"--json {target} cannot be written: {target if target.exists() else parent} is not "
                          "writable; choose another path or fix its permissions")
    return target


# ---------------------------------------------------------------- saving


def save(model, tokenizer, output_dir: str | os.PathLike, metadata: dict | None = None, overwrite: bool = False,
         extra_files: dict | None = None, save_format: str = "dense") -> Path:
    """Write ``model`` (zeros in its weights), its tokenizer and ``metadata`` to ``output_dir``.

    A ``"structure"`` manifest (the shapes ``config.json`` cannot rebuild: compact or narrowed layers)
    is always computed from the model itself; of a ``"structure"`` in ``metadata`` only its
    ``"config"`` overrides are kept.
    ``extra_files`` maps file names to functions that write that file, given its path.
    ``save_format``: "dense" (a plain checkpoint) or "sparse-bitmask" (the block linears' weights that
    it shrinks as compressed tensors, in the packed 2:4 layout when they all fit it; what was done is
    recorded under "save_format" in ``sparseforge.json``).

    Everything is written to a temporary sibling directory first and renamed into
    place at the end, so an interrupted run leaves no half-written output.
    """
    if save_format not in SAVE_FORMATS:
        raise ConfigError(f"save format '{save_format}' unknown: choose from {', '.join(SAVE_FORMATS)}")
    out = check_output(output_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    tmp = Path(tempfile.mkdtemp(prefix=f"{_sibling_prefix(out, 'tmp')}{pid}-", dir=out.parent))
    old = None
    try:
        model.save_pretrained(tmp)
        metadata = dict(metadata or {})
        metadata.pop("save_format", None)  # describes a previous save's files, not these
        # the shapes that config.json cannot rebuild, read from the model itself: whatever made them
        # (a structured method, a later prune or fine-tune of such a model), the copy loads
        from torch import nn

        from .models.modules import model_structure

        if isinstance(model, nn.Module):  # anything else with save_pretrained keeps the caller's manifest
            given = metadata.pop("structure", None)
            overrides = given.get("config") if isinstance(given, dict) else None
            structure = model_structure(model, overrides if isinstance(overrides, dict) else None)
            if structure is not None:
                metadata["structure"] = structure
        if save_format != "dense":
            from .sparse_checkpoint import compress_directory

            metadata["save_format"] = compress_directory(tmp, model)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        for name, write in (extra_files or {}).items():
            write(tmp / name)
        if out.exists():
            # made before the renames, so nothing but the two renames lies between them; a kill there is
            # repaired by the next save (clean_stale puts the old output back)
            old = Path(tempfile.mkdtemp(prefix=f"{_sibling_prefix(out, 'old')}{pid}-", dir=out.parent))
            kept = old / out.name
            os.replace(out, kept)
            os.replace(tmp, out)
        else:
            os.replace(tmp, out)
    except BaseException:
        if old is not None and (old / out.name).exists() and not out.exists():
            os.replace(old / out.name, out)  # interrupted between the renames: the old output goes back
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def saved_dtype(model_dir: str | os.PathLike) -> str:
    """The dtype a saved directory's config.json records ("float32" when it records none we load)."""
    from .sparse_checkpoint import read_config

    path = Path(model_dir)
    config = read_config(path) if path.is_dir() else {}
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if dtype in DTYPES else "float32"


def export_model(source: str | os.PathLike, output_dir: str | os.PathLike, save_format: str, overwrite: bool = False,
                 dtype: str | None = None) -> Path:
    """Load a saved model (any format ``load_model`` reads) and save it again in ``save_format``, in the dtype
    it was saved in unless ``dtype`` is given; its ``sparseforge.json`` is kept (the structure manifest is
    computed again from the loaded model)."""
    from .loading import load_model

    if save_format not in SAVE_FORMATS:
        raise ConfigError(f"--format '{save_format}' unknown: choose from {', '.join(SAVE_FORMATS)}")
    check_output(output_dir, overwrite, inputs=[source])
    metadata = read_metadata(source)
    model, tokenizer = load_model(source, dtype=dtype or saved_dtype(source))
    return save(model, tokenizer, output_dir, metadata=metadata, overwrite=overwrite, save_format=save_format)


def read_metadata(model_dir: str | os.PathLike) -> dict:
    """The ``sparseforge.json`` of a saved model ({} if it has none, and for a GGUF file)."""
    path = Path(model_dir)
    if path.suffix == ".gguf" and path.is_file():
        return {}  # a GGUF file is a model too; it never has a sparseforge.json
    if not path.is_dir():
        raise ModelError(f"model directory {path} not found: check the path")
    meta = path / METADATA_FILE
    if not meta.is_file():
        return {}
    try:
        data = json.loads(meta.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"cannot read {meta} ({first_line(e)}): fix the file or delete it") from None
    if not isinstance(data, dict):
        raise ModelError(f"{meta} is not a JSON object: fix the file or delete it")
    return data
