"""Perplexity (METHODS.md section 8): mean next-token NLL over non-overlapping windows, exp'd."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import NumericalError


def perplexity(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = True) -> dict:
    """Perplexity of ``model`` on (n, seq_len) token windows; NLL summed in float32."""
    start = time.perf_counter()
    nll_sum, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in tqdm(torch.split(windows, batch_size), desc="perplexity", disable=not progress):
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
            targets = batch[:, 1:]
            nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
            nll_sum += float(nll)
            count += targets.numel()
    model.train(was_training)
    mean_nll = nll_sum / max(count, 1)
    if not math.isfinite(mean_nll):
        raise NumericalError("perplexity is not finite: the model produced non-finite logits; evaluate in float32")
    return {
        "perplexity": math.exp(mean_nll),
        "nll": mean_nll,
        "n_windows": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
        "n_tokens": count,
        "seconds": round(time.perf_counter() - start, 3),
    }
