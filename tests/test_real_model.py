"""The embedded SmolLM2-135M: a few blocks pruned for real, perplexity finite and near dense."""

import math

import pytest
import torch

from sparseforge import evaluate, load_model, prune
from sparseforge.data import load_windows

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smol(smol_dir):
    return load_model(smol_dir)


def test_pruning_first_blocks_keeps_perplexity_close(smol):
    model, tokenizer = smol
    dense = evaluate(model, tokenizer, seq_len=128, max_windows=4, progress=False)
    calibration = load_windows(tokenizer, "wiki", "train", 128, n=8, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items() if ".layers.5." in k}
    report = prune(model, tokenizer, method="sparsegpt", sparsity=0.2, calibration=calibration,
                   block_fraction=0.1, progress=False)
    pruned = evaluate(model, tokenizer, seq_len=128, max_windows=4, progress=False)
    assert {layer.name.split(".")[2] for layer in report.layers} == {"0", "1", "2"}
    assert report.sparsity == pytest.approx(0.2, abs=1e-4)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # later blocks untouched
    assert math.isfinite(pruned["perplexity"])
    assert dense["perplexity"] < 40  # a real language model, not noise
    assert abs(pruned["perplexity"] / dense["perplexity"] - 1) < 0.05, (dense, pruned)
