"""Checks that need the model's shape but not its weights, run before anything slow.

``model_skeleton`` builds the model from its config alone on the meta device (no memory,
no weights read), so layer names and widths are known in a second: an N:M pattern that
does not fit a layer, or a glob that matches no layer, is refused before the weights,
the data and the dense evaluation are loaded.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def model_skeleton(source: str | os.PathLike | None):
    """The causal LM of ``source`` on the meta device, or None where the loader must decide.

    None for sources whose modules the config alone does not describe (a saved structure
    manifest) or that fail to build: ``load_model`` then gives its own one-line error.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .errors import SparseforgeError
    from .loading import _structure_manifest, resolve_model_dir

    name, extra = resolve_model_dir(source)
    if os.path.isdir(name) and _structure_manifest(name) is not None:
        return None
    try:
        config = AutoConfig.from_pretrained(name, **extra)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except SparseforgeError:
        raise
    except Exception as e:  # the loader reports it with the file and the fix
        log.debug("no skeleton of %s: %s", name, e)
        return None


def check_prune_plan(source, config) -> None:
    """Refuse a one-shot ``config`` that cannot apply to the model at ``source`` (widths, globs)."""
    from .oneshot.engine import plan_layers

    skeleton = model_skeleton(source)
    if skeleton is not None:
        plan_layers(skeleton, config)
