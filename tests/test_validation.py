"""The early checks: number types, the layer plan on a weightless model, and the warnings."""

from __future__ import annotations

import argparse
import logging

import pytest
import torch

from sparseforge.errors import ConfigError, PatternError
from sparseforge.oneshot.engine import OneShotConfig, plan_layers
from sparseforge.validate import fraction, integer, positive, real


@pytest.mark.parametrize("parse, text, value", [
    (integer(1), "3", 3), (integer(0), "0", 0), (positive("0.01"), "1e-3", 1e-3),
    (fraction("0.5"), "0.5", 0.5), (fraction("0.5", one=True), "1", 1.0), (fraction("0.1", zero=True), "0", 0.0),
    (real(0.0, example="0.01"), "0", 0.0),
])
def test_number_types_accept(parse, text, value):
    assert parse(text) == value


@pytest.mark.parametrize("parse, text, fragment", [
    (integer(1), "0", "at least 1"), (integer(0), "-3", "at least 0"), (integer(1), "2.5", "whole number"),
    (positive("0.01"), "0", "outside (0, inf]"), (positive("0.01"), "inf", "finite"), (positive("0.01"), "nan", "finite"),
    (positive("0.01"), "-1", "e.g. 0.01"), (fraction("0.5"), "1", "outside (0, 1)"), (fraction("0.5"), "0", "outside"),
    (fraction("0.5", one=True), "1.5", "(0, 1]"), (real(0.0), "-0.1", "[0, inf]"), (real(0.0), "abc", "not a number"),
])
def test_number_types_refuse_in_one_line(parse, text, fragment):
    with pytest.raises(argparse.ArgumentTypeError) as info:
        parse(text)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def _meta_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def test_plan_on_a_weightless_model_checks_widths_and_globs():
    model = _meta_llama()
    plan = plan_layers(model, OneShotConfig(pattern="2:4", skip=("*.self_attn.o_proj",)))
    assert len(plan) == 2 and "self_attn.o_proj" not in plan[0] and plan[0]["mlp.down_proj"].m == 4
    # down_proj's input width is the FFN's 96: 3:64 fits hidden (64) but not 96
    with pytest.raises(PatternError, match="model.layers.0.mlp.down_proj.*96"):
        plan_layers(model, OneShotConfig(pattern="3:64"))
    with pytest.raises(ConfigError, match="--override 'model.layer.*' matches no layer"):
        plan_layers(model, OneShotConfig(overrides={"model.layer.*": "0.3"}))
    with pytest.raises(ConfigError, match="--skip 'nothing' matches no layer"):
        plan_layers(model, OneShotConfig(skip=("nothing",)))
    with pytest.raises(ConfigError, match="leaves no layer to prune"):
        plan_layers(model, OneShotConfig(skip=("*",)))
    # the glob may match a layer in a block that --block-fraction leaves dense: still a real layer name
    plan = plan_layers(model, OneShotConfig(block_fraction=0.5, overrides={"model.layers.1.*": "0.9"}))
    assert plan[1] == {} and plan[0]


def test_prune_plan_is_checked_without_reading_weights(tiny_dir, tmp_path):
    """A pattern that cannot fit is refused from config.json alone: garbage weights are never read."""
    import shutil

    from sparseforge.preflight import check_prune_plan

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(PatternError, match="not a multiple of M=48"):
        check_prune_plan(str(broken), OneShotConfig(pattern="2:48"))
    check_prune_plan(str(broken), OneShotConfig(pattern="2:4"))  # fits: no error, still nothing read


def test_binary_text_is_detected(tmp_path, caplog):
    from sparseforge.data import load_documents, looks_binary

    assert looks_binary(bytes(range(256)) * 8)
    assert not looks_binary("Ein ganz gewöhnlicher Satz, mit Umlauten.\n".encode() * 50)
    path = tmp_path / "weights.txt"
    path.write_bytes(torch.randn(2000).numpy().tobytes())
    with caplog.at_level(logging.WARNING):
        load_documents(str(path))
    assert "looks like a binary file" in caplog.text
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"one\r\ntwo\rthree\n")
    assert load_documents(str(crlf)) == ["one\ntwo\nthree\n"]


def test_instructions_with_only_empty_responses_warn(tmp_path, caplog):
    import json

    from sparseforge.train.data import read_instructions

    path = tmp_path / "alpaca.jsonl"
    path.write_text("\n".join(json.dumps({"instruction": f"say {i}", "output": " "}) for i in range(3)))
    with caplog.at_level(logging.WARNING):
        read_instructions(path)
    assert "every response" in caplog.text
    caplog.clear()
    path.write_text(json.dumps({"instruction": "say", "output": "hi"}))
    with caplog.at_level(logging.WARNING):
        read_instructions(path)
    assert "every response" not in caplog.text


def test_default_learning_rates_follow_method_and_task():
    from sparseforge.methods import default_lr

    # recovery: the winners of one search over both methods (benchmarks/recovery.py, docs/finetune.md)
    assert default_lr("spp") == 3.6e-2 and default_lr("lora-star") == default_lr("lora") == 9e-3
    assert default_lr("losparse") == 1e-4 and default_lr("losparse", "lm") == 1e-4
    # classification at short budgets trains at 5e-4 (measured on MiniLM / wiki-topics; see methods.py)
    assert default_lr("losparse", "classify") == default_lr("dense", "classify") == 5e-4
    assert default_lr("lowrank", "classify") == 1e-4  # measured worse at 5e-4
    assert default_lr("spp", "classify") == 3.6e-2  # no task-specific default: the method's own
