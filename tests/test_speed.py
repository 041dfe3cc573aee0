"""Speed benchmark: structure, interleaving and decisions (timings are never asserted)."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from sparseforge.errors import ConfigError, ModelError
from sparseforge.eval import speed
from sparseforge.eval.speed import (
    SpeedConfig,
    benchmark_speed,
    format_speed_table,
    greedy_decode,
    measure_peak_memory,
    parameter_bytes,
)
from sparseforge.measure import peak_rss_mb

SMALL = SpeedConfig(prefill_tokens=16, decode_tokens=4, context=16, repeats=3, warmup=1)


def llama(intermediate=128, tie=False, init=0.02, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie, initializer_range=init)
    return LlamaForCausalLM(config).eval()


def bert_classifier():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(config).eval()


def test_benchmark_two_llamas():
    result = benchmark_speed([("dense", llama()), ("small", llama(intermediate=32))], SMALL, progress=False)
    assert set(result) >= {"config", "machine", "dtype", "models", "note", "schedule", "load_average"}
    assert result["config"]["repeats"] == 3
    assert result["dtype"] == {"dense": "float32", "small": "float32"}
    assert "a zero-filled (unstructured) sparse model runs at dense speed; only physically smaller models are faster" in result["note"]
    json.dumps(result)  # machine-readable
    dense, small = result["models"]
    assert small["parameters"] < dense["parameters"] and small["bytes"] < dense["bytes"]
    for m in result["models"]:
        assert len(m["prefill_seconds"]) == 3 and len(m["decode_seconds"]) == 3
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "speedup_prefill", "speedup_decode"):
            assert math.isfinite(m[key]) and m[key] > 0
        assert all(s > 0 for s in m["prefill_seconds"] + m["decode_seconds"])
    assert dense["speedup_prefill"] == 1.0 and dense["speedup_decode"] == 1.0


def test_rounds_are_interleaved(monkeypatch):
    calls = []
    real_prefill, real_decode = speed.prefill_seconds, speed.decode_seconds
    names = {}

    def prefill(model, ids):
        calls.append((names[id(model)], "prefill", tuple(ids.shape)))
        return real_prefill(model, ids)

    def decode(model, ids, n):
        calls.append((names[id(model)], "decode", tuple(ids.shape)))
        return real_decode(model, ids, n)

    monkeypatch.setattr(speed, "prefill_seconds", prefill)
    monkeypatch.setattr(speed, "decode_seconds", decode)
    models = [("A", llama()), ("B", llama(intermediate=32)), ("C", llama(intermediate=64))]
    names.update({id(m): label for label, m in models})
    config = SpeedConfig(prefill_tokens=8, decode_tokens=2, context=8, repeats=2, warmup=1)
    result = benchmark_speed(models, config, progress=False)
    expected = [(label, phase) for _ in range(3) for label in "ABC" for phase in ("prefill", "decode")]
    assert [c[:2] for c in calls] == expected
    assert [(s["label"], s["warmup"]) for s in result["schedule"]] == [(x, r == 0) for r in range(3) for x in "ABC"]


def test_same_ids_for_models_sharing_a_vocab(monkeypatch):
    seen = []
    monkeypatch.setattr(speed, "prefill_seconds", lambda model, ids: seen.append(ids.clone()) or 1.0)
    monkeypatch.setattr(speed, "decode_seconds", lambda model, ids, n: 1.0)
    config = SpeedConfig(prefill_tokens=8, context=8, repeats=1, warmup=0)
    benchmark_speed([("a", llama()), ("b", llama(intermediate=32))], config, progress=False)
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])


@pytest.mark.parametrize("seed", [0, 1])
def test_hand_decode_loop_matches_generate(seed):
    model = llama(init=0.5, seed=seed)  # large weights: varied greedy tokens
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(seed))
    tokens, seconds = greedy_decode(model, ids, 9)
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False, pad_token_id=0)[:, 12:]
    assert tokens.shape == (1, 10) and seconds > 0
    assert torch.equal(tokens, expected)
    assert len(set(tokens[0].tolist())) > 2


def test_encoder_gets_prefill_only():
    result = benchmark_speed([("bert", bert_classifier())], SMALL, progress=False)
    (m,) = result["models"]
    assert m["decode_tokens_per_s"] is None and m["decode_seconds"] is None and m["speedup_decode"] is None
    assert m["prefill_tokens_per_s"] > 0 and len(m["prefill_seconds"]) == 3 and m["speedup_prefill"] == 1.0
    assert "-" in format_speed_table(result)


def test_parameter_bytes_counts_tied_embeddings_once():
    model = llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    h, i, v, kv, layers = 64, 128, 128, 32, 2
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * i + 2 * h  # q, k+v, o, gate/up/down, two norms
    expected = v * h + layers * per_layer + h  # embeddings (= LM head), blocks, final norm; inv_freq is not persistent
    assert parameter_bytes(model) == {"parameters": expected, "bytes": 4 * expected}
    untied = llama(tie=False)
    assert parameter_bytes(untied)["parameters"] == expected + v * h


def test_format_table_and_bad_input():
    config = SpeedConfig(8, 2, 8, repeats=1, warmup=0)
    result = benchmark_speed([("dense", llama()), ("pruned", llama(intermediate=32))], config, progress=False)
    result["models"][1]["peak_rss_mb"] = 321.0
    table = format_speed_table(result)
    assert "dense" in table and "pruned" in table and "peak MiB" in table and "321" in table
    with pytest.raises(ConfigError, match="unique"):
        benchmark_speed([("a", llama()), ("a", llama())], SMALL, progress=False)
    with pytest.raises(ConfigError, match="repeats"):
        SpeedConfig(repeats=0)
    with pytest.raises(ConfigError, match="lower context or decode_tokens"):
        benchmark_speed([("a", llama())], SpeedConfig(prefill_tokens=8, context=250, decode_tokens=10), progress=False)


def test_measure_peak_memory_in_a_child(tiny_dir, monkeypatch):
    config = SpeedConfig(prefill_tokens=16, decode_tokens=4, context=16, threads=1)
    result = measure_peak_memory(tiny_dir, config)
    assert result["source"] == str(tiny_dir)
    assert result["rss_after_load_mb"] > 0 and result["peak_rss_mb"] >= result["rss_after_load_mb"]
    assert result["peak_rss_mb"] <= result["ru_maxrss_mb"]  # ru_maxrss also holds the parent's peak (inherited on Linux)
    assert 0 < speed.own_peak_rss_mb() <= peak_rss_mb() + 1

    def failing_child(cmd, **kwargs):  # the error path without a second (slow) child
        assert cmd[1:4] == ["-m", "sparseforge.eval.speed", "--memory-probe"]
        return subprocess.CompletedProcess(cmd, 2, stdout="", stderr="loading...\nModelError: model x not found: check the path\n")

    monkeypatch.setattr(speed.subprocess, "run", failing_child)
    with pytest.raises(ModelError, match="^memory probe for x failed: ModelError: model x not found: check the path$"):
        measure_peak_memory("x", config)
