"""Every way a model directory, GGUF file or weight file can be unreadable is one ModelError line naming the file and the fix."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from sparseforge.assets import embedded_encoder_dir, embedded_model_gguf
from sparseforge.errors import ModelError
from sparseforge.export import save
from sparseforge.loading import load_model
from sparseforge.models import structure_manifest
from sparseforge.models.modules import replace_module
from tiny import tiny_llama

SUPPORTED = "supported are bert, gpt2, llama, mistral, opt, qwen2, qwen3, roberta"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama with a real tokenizer that needs no download (the embedded MiniLM's)."""
    path = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    tiny_llama().save_pretrained(path)
    AutoTokenizer.from_pretrained(embedded_encoder_dir()).save_pretrained(path)
    return path


@pytest.fixture
def model_dir(base_dir, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(base_dir, path)
    return path


def one_line_error(source, **kwargs) -> str:
    with pytest.raises(ModelError) as err:
        load_model(source, **kwargs)
    message = str(err.value)
    assert "\n" not in message and len(message) < 400, message
    return message


def cut_in_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def shard(path):
    """Split model.safetensors into two shards with an index, then lose the second shard."""
    from safetensors.torch import save_file

    state = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "model-00002-of-00002.safetensors").unlink()


CONFIG_FIX = "restore it from the original model or save the model again"
DAMAGE = {
    # name: (change the directory, the file the message names (relative), words of the message)
    "weights cut in half": (lambda d: cut_in_half(d / "model.safetensors"), "model.safetensors",
                            ["truncated or damaged", "copy it again or save the model again"]),
    "weights garbage": (lambda d: (d / "model.safetensors").write_bytes(b"\x07" * 5000), "model.safetensors",
                        ["truncated or damaged"]),
    "config not JSON": (lambda d: (d / "config.json").write_text("{not json"), "config.json",
                        ["is not valid JSON", CONFIG_FIX]),
    "config empty": (lambda d: (d / "config.json").write_text(""), "config.json", ["is empty", CONFIG_FIX]),
    "config a list": (lambda d: (d / "config.json").write_text("[1, 2]"), "config.json",
                      ["is not a JSON object", CONFIG_FIX]),
    "config without model_type": (lambda d: (d / "config.json").write_text("{}"), "config.json",
                                  ['has no "model_type"', CONFIG_FIX]),
    "tokenizer.json damaged": (lambda d: (d / "tokenizer.json").write_text('{"model": '), "tokenizer.json",
                               ["is not valid JSON", "copy the tokenizer files from the original model"]),
    "tokenizer_config damaged": (lambda d: (d / "tokenizer_config.json").write_bytes(b"\xff\xfe{"),
                                 "tokenizer_config.json", ["cannot read", "copy the tokenizer files"]),
    "tokenizer files missing": (lambda d: [(d / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json")],
                                "", ["cannot read the tokenizer of", "copy them from the original model"]),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), "",
                   ["has a config.json but no weights", "copy the weight files too"]),
    "index names a missing shard": (shard, "model-00002-of-00002.safetensors",
                                    ["listed in model.safetensors.index.json is missing", "copy the missing shards"]),
    "index damaged": (lambda d: (shard(d), (d / "model.safetensors.index.json").write_text("{")),
                      "model.safetensors.index.json", ["is not valid JSON", "save the model again"]),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_model_directory_is_one_line(model_dir, damage):
    change, file, words = DAMAGE[damage]
    change(model_dir)
    message = one_line_error(model_dir)
    assert str(model_dir / file).rstrip("/") in message and all(w in message for w in words), message
    assert "Traceback" not in message


def test_a_damaged_structured_model_is_one_line(model_dir, tmp_path):
    """A model with physically smaller layers is rebuilt from its manifest and loads its safetensors itself."""
    torch.manual_seed(0)
    model = tiny_llama()
    name = "model.layers.0.mlp.down_proj"
    replace_module(model, name, torch.nn.Linear(128, 64, bias=True))  # a bias the config does not build
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = save(model, tokenizer, tmp_path / "structured", metadata={})
    assert json.loads((out / "sparseforge.json").read_text())["structure"] == structure_manifest(model, include=[name])
    load_model(out)  # loads before the damage
    cut_in_half(out / "model.safetensors")
    message = one_line_error(out)
    assert str(out / "model.safetensors") in message and "truncated or damaged" in message


@pytest.mark.parametrize("model_type, task", [("t5", None), ("t5", "classify"), ("nonsense", None),
                                              ("nonsense", "classify"), ("codegen", None)])
def test_an_unsupported_architecture_lists_sparseforge_families(model_dir, model_type, task):
    config = json.loads((model_dir / "config.json").read_text())
    config.update(model_type=model_type, architectures=None)
    (model_dir / "config.json").write_text(json.dumps(config))
    message = one_line_error(model_dir, task=task)
    assert message.startswith(f"unsupported architecture model_type '{model_type}': {SUPPORTED}; "), message
    assert "families.py" in message


def test_a_truncated_gguf_file_is_one_line(tmp_path):
    path = tmp_path / "cut.gguf"
    with open(embedded_model_gguf(), "rb") as f:
        path.write_bytes(f.read(1 << 16))  # the header and part of the metadata (a longer cut parses slowly)
    message = one_line_error(path)
    assert message.startswith(f"cannot read GGUF file {path}: it is truncated or not GGUF (")
    assert message.endswith("download or copy it again")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all" * 100)
    assert "truncated or not GGUF" in one_line_error(tmp_path / "junk.gguf")


def test_a_gguf_path_that_is_a_directory(tmp_path):
    (tmp_path / "m.gguf").mkdir()
    assert one_line_error(tmp_path / "m.gguf") == f"{tmp_path / 'm.gguf'} is a directory, not a GGUF file: " \
                                                  "give the .gguf file itself"
