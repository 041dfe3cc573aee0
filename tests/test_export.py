"""Saving: vanilla transformers loads the result, logits identical, writes are atomic."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from sparseforge import load_model, prune, read_metadata, save
from sparseforge.errors import ConfigError


def test_save_load_round_trip_identical_logits(tiny_dir, tmp_path):
    model, tokenizer = load_model(tiny_dir)
    ids = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    report = prune(model, tokenizer, method="sparsegpt", pattern="2:4", calibration=ids, progress=False)
    out = save(model, tokenizer, tmp_path / "pruned", metadata={"pruning": report.to_dict()})
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    assert reloaded.model.layers[1].mlp.down_proj.weight.eq(0).float().mean() == 0.5
    meta = read_metadata(out)
    assert meta["pruning"]["config"]["pattern"] == "2:4"
    assert meta["pruning"]["calibration"]["fingerprint"]
    json.dumps(meta)


def test_interrupted_save_leaves_nothing(tiny_dir, tmp_path, monkeypatch):
    model, tokenizer = load_model(tiny_dir)

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer, "save_pretrained", broken)
    with pytest.raises(KeyboardInterrupt):
        save(model, tokenizer, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tiny_dir, tmp_path):
    model, tokenizer = load_model(tiny_dir)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="--overwrite"):
        save(model, tokenizer, out)
    save(model, tokenizer, out, overwrite=True)
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
