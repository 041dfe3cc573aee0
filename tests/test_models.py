"""Architecture adapters, module surgery, the reparametrised-linear protocol, structure manifests, loading by task."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer, BertModel, LlamaConfig, LlamaForCausalLM

from sparseforge.assets import embedded_encoder_dir
from sparseforge.errors import ConfigError, ModelError
from sparseforge.eval.sparsity_report import sparsity_summary, structure_summary
from sparseforge.export import METADATA_FILE, save
from sparseforge.loading import load_model
from sparseforge.models import (
    BertAdapter,
    ReparametrisedLinear,
    get_adapter,
    get_weight,
    in_features,
    is_prunable,
    set_weight,
)
from sparseforge.models.modules import (
    STRUCTURE_CLASSES,
    apply_structure,
    block_linears,
    register_structure_class,
    replace_module,
    structure_manifest,
)
from tiny import TINY_ENCODERS, VOCAB, tiny_bert, tiny_gpt2, tiny_llama, tiny_opt

LLAMA_LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


class MaskedLinear(nn.Module):
    """A fake reparametrised linear: no ``.weight``; its dense weight is a Linear's weight times a fixed mask."""

    def __init__(self, linear: nn.Linear, mask: torch.Tensor):
        super().__init__()
        self.inner = linear
        self.register_buffer("mask", mask.to(linear.weight.dtype))
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dense_weight(self) -> torch.Tensor:
        return self.inner.weight * self.mask

    def forward(self, x):
        return nn.functional.linear(x, self.dense_weight(), self.inner.bias)


class FactoredLinear(nn.Module):
    """A structured test module: y = B(A x), rank ``rank``; rebuilt from its structure."""

    def __init__(self, in_features: int, out_features: int, rank: int, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.a = nn.Linear(in_features, rank, bias=False, dtype=dtype)
        self.b = nn.Linear(rank, out_features, bias=False, dtype=dtype)

    def dense_weight(self) -> torch.Tensor:
        return self.b.weight @ self.a.weight

    def forward(self, x):
        return self.b(self.a(x))

    def structure(self) -> dict:
        return {"class": "FactoredLinear_test", "in_features": self.in_features, "out_features": self.out_features,
                "rank": self.rank}

    @classmethod
    def from_structure(cls, structure: dict, dtype) -> FactoredLinear:
        return cls(structure["in_features"], structure["out_features"], structure["rank"], dtype=dtype)


register_structure_class("FactoredLinear_test", f"{__name__}:FactoredLinear")


@pytest.fixture(scope="module")
def tokenizer():
    """A real tokenizer with no download: the embedded MiniLM's (pad id 0, inside the tiny vocabulary)."""
    return AutoTokenizer.from_pretrained(embedded_encoder_dir())


def ids(batch=2, length=12, seed=3):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def factor(model, name: str, rank: int = 8) -> FactoredLinear:
    old = model.get_submodule(name)
    new = FactoredLinear(old.in_features, old.out_features, rank)
    replace_module(model, name, new)
    return new


def shrink_ffn(model, block: int, keep: int) -> list[str]:
    """Physically remove FFN channels of one llama block: gate/up lose outputs, down loses inputs."""
    prefix = f"model.layers.{block}.mlp"
    names = []
    for part, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
        old = model.get_submodule(f"{prefix}.{part}")
        weight = old.weight.detach().narrow(dim, 0, keep)
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            new.weight.copy_(weight)
        replace_module(model, f"{prefix}.{part}", new)
        names.append(f"{prefix}.{part}")
    return names


# --- adapters ---------------------------------------------------------------------------------------------------


def test_bert_adapter_finds_the_blocks_of_classifier_and_bare_encoder():
    torch.manual_seed(0)
    classifier = tiny_bert()
    bare = BertModel(classifier.config)
    for model, blocks_name in ((classifier, "bert.encoder.layer"), (bare, "encoder.layer")):
        adapter = get_adapter(model)
        assert isinstance(adapter, BertAdapter) and adapter.causal is False
        assert adapter.blocks_name == blocks_name
        assert adapter.blocks is model.get_submodule(blocks_name) and len(adapter.blocks) == 2
        assert list(block_linears(model))[:4] == [f"{blocks_name}.0.attention.self.{p}" for p in ("query", "key", "value")] \
            + [f"{blocks_name}.0.attention.output.dense"]
        assert len(block_linears(model)) == 2 * 6
    assert set(TINY_ENCODERS) == {"bert"}


@pytest.mark.parametrize("build, expected", [
    (tiny_llama, dict(q="self_attn.q_proj", o="self_attn.o_proj", qkv=None, num_heads=4, num_kv_heads=2, head_dim=16,
                      rope=True, group_size=2)),
    (tiny_opt, dict(q="self_attn.q_proj", o="self_attn.out_proj", qkv=None, num_heads=4, num_kv_heads=4, head_dim=16,
                    rope=False, group_size=1)),
    (tiny_gpt2, dict(q=None, k=None, v=None, o="attn.c_proj", qkv="attn.c_attn", num_heads=4, num_kv_heads=4, head_dim=16,
                     rope=False, group_size=1)),
    (tiny_bert, dict(q="attention.self.query", v="attention.self.value", o="attention.output.dense", qkv=None,
                     num_heads=4, num_kv_heads=4, head_dim=16, rope=False, group_size=1)),
], ids=["llama", "opt", "gpt2", "bert"])
def test_attention_spec(build, expected):
    model = build()
    adapter = get_adapter(model)
    spec = adapter.attention()
    for key, value in expected.items():
        assert getattr(spec, key) == value, key
    block = adapter.blocks[0]
    for role in ("q", "k", "v", "o", "qkv"):  # every named projection exists in the block
        if getattr(spec, role):
            assert is_prunable(block.get_submodule(getattr(spec, role)))
    assert spec.num_heads * spec.head_dim == model.config.hidden_size


# --- module surgery ---------------------------------------------------------------------------------------------


def test_block_linears_in_adapter_order():
    model = tiny_llama()
    names = list(block_linears(model))
    assert names == [f"model.layers.{b}.{n}" for b in range(2) for n in LLAMA_LINEARS]
    assert block_linears(model)["model.layers.1.mlp.up_proj"] is model.model.layers[1].mlp.up_proj


def test_replace_module_returns_the_old_one_and_rejects_bad_names():
    model = tiny_llama().eval()
    old = model.model.layers[0].mlp.up_proj
    new = nn.Linear(64, 128, bias=False)
    assert new.training
    assert replace_module(model, "model.layers.0.mlp.up_proj", new) is old
    assert model.model.layers[0].mlp.up_proj is new and not new.training  # takes the old module's mode
    block = model.model.layers[1]
    assert replace_module(model, "model.layers.1", nn.Identity()) is block  # a ModuleList entry
    assert isinstance(model.model.layers[1], nn.Identity)
    for bad in ("model.layers.0.mlp.nope", "model.layers.9", "", "model.layers.0.mlp.up_proj.weight", "nope.up_proj"):
        with pytest.raises(ModelError, match="no module") as err:
            replace_module(model, bad, nn.Identity())
        assert "\n" not in str(err.value)
    assert model.model.layers[0].mlp.up_proj is new  # nothing changed by the failures


# --- reparametrised linears ---------------------------------------------------------------------------------------


def test_reparametrised_linear_is_read_like_a_linear_and_never_written():
    torch.manual_seed(0)
    model = tiny_llama().eval()
    name = "model.layers.1.mlp.down_proj"
    linear = model.get_submodule(name)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0]).repeat(linear.out_features, linear.in_features // 4)  # 2:4, half zero
    fake = MaskedLinear(linear, mask)
    replace_module(model, name, fake)
    assert not hasattr(fake, "weight")
    assert isinstance(fake, ReparametrisedLinear) and not isinstance(linear, ReparametrisedLinear)
    assert is_prunable(fake) and in_features(fake) == 128
    assert torch.equal(get_weight(fake), linear.weight * mask)
    with pytest.raises(ModelError, match="computed from its factors"):
        set_weight(fake, torch.zeros(64, 128))

    with torch.enable_grad():  # mid-training: the summary must not build a graph or fail
        summary = sparsity_summary(model)
    layers = {layer["name"]: layer for layer in summary["layers"]}
    assert len(layers) == 14
    assert layers[name]["sparsity"] == 0.5 and layers[name]["shape"] == [64, 128]
    assert str(layers[name]["pattern"]) == "2:4"
    assert all(layer["sparsity"] == 0.0 for n, layer in layers.items() if n != name)
    assert summary["prunable_sparsity"] == pytest.approx(64 * 128 * 0.5 / summary["prunable_parameters"])


# --- structure manifests ------------------------------------------------------------------------------------------


def test_structure_registry_is_a_whitelist():
    assert STRUCTURE_CLASSES["Linear"] == "torch.nn:Linear"
    assert STRUCTURE_CLASSES["CompactLoSparseLinear"] == "sparseforge.lowrank.layers:CompactLoSparseLinear"
    register_structure_class("FactoredLinear_test", f"{__name__}:FactoredLinear")  # the same again: fine
    with pytest.raises(ConfigError, match="already registered"):
        register_structure_class("FactoredLinear_test", "os:path")
    with pytest.raises(ConfigError, match="malformed"):
        register_structure_class("X", "os.path")
    model = tiny_llama()
    with pytest.raises(ModelError, match="not registered"):
        apply_structure(model, {"modules": {"model.layers.0.mlp.up_proj": {"class": "os:system"}}})
    with pytest.raises(ModelError, match="damaged"):
        apply_structure(model, {"modules": {"model.layers.0.mlp.up_proj": {"class": "Linear", "in_features": 64}}})
    with pytest.raises(ModelError, match="no \"modules\""):
        apply_structure(model, {"config": {}})


def test_manifest_records_structured_modules_and_included_linears():
    torch.manual_seed(0)
    model = tiny_llama()
    factor(model, "model.layers.1.self_attn.q_proj", rank=8)
    shrunk = shrink_ffn(model, 0, keep=96)
    manifest = structure_manifest(model)
    assert manifest == {"modules": {"model.layers.1.self_attn.q_proj": {
        "class": "FactoredLinear_test", "in_features": 64, "out_features": 64, "rank": 8}}, "config": {}}
    manifest = structure_manifest(model, include=shrunk)
    assert manifest["modules"]["model.layers.0.mlp.down_proj"] == {"class": "Linear", "in_features": 96, "out_features": 64,
                                                                   "bias": False}
    json.dumps(manifest)
    rows = structure_summary(model)
    assert rows == [{"name": "model.layers.1.self_attn.q_proj", "parameters": 64 * 8 + 8 * 64,
                     "structure": manifest["modules"]["model.layers.1.self_attn.q_proj"]}]

    fresh = tiny_llama()
    assert apply_structure(fresh, manifest, torch.float32) == list(manifest["modules"])
    assert isinstance(fresh.model.layers[1].self_attn.q_proj, FactoredLinear)
    assert fresh.model.layers[0].mlp.gate_proj.weight.shape == (96, 64)
    fresh.load_state_dict(model.state_dict())  # strict: every key and shape fits

    class Unregistered(nn.Linear):
        def structure(self):
            return {"class": "Unregistered"}

    replace_module(model, "model.layers.0.self_attn.o_proj", Unregistered(64, 64))
    with pytest.raises(ModelError, match="not registered"):
        structure_manifest(model)


def save_structured(model, tokenizer, path, include=()):
    """Save as every save does; the manifest it writes is the one the test names (structured modules and
    exactly the ``include``d narrowed linears), found from the model alone."""
    from sparseforge.models.modules import model_structure

    assert model_structure(model) == structure_manifest(model, include=include)
    return save(model, tokenizer, path, metadata={})


def test_structured_model_round_trip_gives_identical_logits(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = tiny_llama().eval()
    factor(model, "model.layers.1.self_attn.q_proj", rank=8)
    factor(model, "model.layers.0.mlp.down_proj", rank=4)
    shrunk = shrink_ffn(model, 1, keep=80)
    save_structured(model, tokenizer, tmp_path / "m", include=shrunk)
    loaded, _ = load_model(tmp_path / "m")
    assert isinstance(loaded.model.layers[0].mlp.down_proj, FactoredLinear)
    assert loaded.model.layers[1].mlp.up_proj.weight.shape == (80, 64)
    assert not loaded.training
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    assert [row["name"] for row in structure_summary(loaded)] == ["model.layers.0.mlp.down_proj",
                                                                  "model.layers.1.self_attn.q_proj"]
    layers = {layer["name"]: layer for layer in sparsity_summary(loaded)["layers"]}
    assert layers["model.layers.1.mlp.down_proj"]["shape"] == [64, 80]

    # the same directory without its manifest: shrunk shapes no longer fit config.json -> one line naming the fix
    meta = json.loads((tmp_path / "m" / METADATA_FILE).read_text())
    (tmp_path / "m" / METADATA_FILE).write_text(json.dumps({k: v for k, v in meta.items() if k != "structure"}))
    with pytest.raises(ModelError, match="structure") as err:
        load_model(tmp_path / "m")
    assert "\n" not in str(err.value) and "mlp" in str(err.value)


def test_tied_embeddings_reload_tied(tmp_path, tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    factor(model, "model.layers.0.mlp.up_proj")
    save_structured(model, tokenizer, tmp_path / "tied")
    assert "lm_head.weight" not in load_file(tmp_path / "tied" / "model.safetensors")  # so it is a missing key on load
    loaded, _ = load_model(tmp_path / "tied")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


@pytest.mark.parametrize("change, words", [
    ("extra", ["unexpected", "model.layers.0.mlp.extra.weight"]),
    ("drop", ["missing", "model.norm.weight"]),
    ("reshape", ["model.layers.0.mlp.up_proj.a.weight", "(4, 64) vs (8, 64)"]),
])
def test_weights_that_do_not_fit_the_manifest_fail_in_one_line(tmp_path, tokenizer, change, words):
    torch.manual_seed(0)
    model = tiny_llama()
    factor(model, "model.layers.0.mlp.up_proj")
    path = save_structured(model, tokenizer, tmp_path / change)
    state = load_file(path / "model.safetensors")
    if change == "extra":
        state["model.layers.0.mlp.extra.weight"] = torch.zeros(3)
    elif change == "drop":
        del state["model.norm.weight"]
    else:
        state["model.layers.0.mlp.up_proj.a.weight"] = torch.zeros(4, 64)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError) as err:
        load_model(path)
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


# --- loading by task ------------------------------------------------------------------------------------------------


@pytest.fixture
def bert_dirs(tmp_path, tokenizer):
    """A bare tiny BERT encoder (like MiniLM's checkpoint) and a tiny BERT classifier with 3 labels."""
    torch.manual_seed(0)
    classifier = tiny_bert(num_labels=3).eval()
    BertModel(classifier.config).save_pretrained(tmp_path / "encoder")
    classifier.save_pretrained(tmp_path / "classifier")
    for name in ("encoder", "classifier"):
        tokenizer.save_pretrained(tmp_path / name)
    return tmp_path / "encoder", tmp_path / "classifier", classifier


def test_classify_a_bert_encoder_with_label_names(bert_dirs, caplog):
    encoder_dir, _, _ = bert_dirs
    names = ["art", "history", "science", "sport"]
    with caplog.at_level(logging.INFO):
        model, tok = load_model(encoder_dir, task="classify", label_names=names)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.id2label == dict(enumerate(names)) and model.config.label2id == {n: i for i, n in enumerate(names)}
    batch = tok(["a short one", "a somewhat longer sentence to pad against"], padding=True, return_tensors="pt")
    batch["input_ids"] = batch["input_ids"] % VOCAB
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 4)
    head = [r for r in caplog.records if "newly initialised classifier head" in r.getMessage()]
    assert len(head) == 1 and head[0].levelno == logging.INFO and "classifier.weight" in head[0].getMessage()
    assert not [r for r in caplog.records if r.name.startswith("transformers.modeling_utils") and r.levelno >= logging.WARNING]


def test_a_saved_classifier_is_inferred_and_keeps_its_head(bert_dirs):
    _, classifier_dir, classifier = bert_dirs
    model, _ = load_model(classifier_dir)  # task inferred from architectures
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 3
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(x).logits, classifier(x).logits)
    with pytest.raises(ModelError, match="3-label classifier head, not 5"):
        load_model(classifier_dir, num_labels=5)


@pytest.mark.parametrize("which, task, match", [
    ("encoder", None, "bert encoder with no causal language-model head: load it with --task classify"),
    ("encoder", "lm", "bert encoder with no causal language-model head: load it with --task classify"),
    ("classifier", "lm", r"holds a sequence classifier \(BertForSequenceClassification\).*--task classify"),
])
def test_architecture_task_mismatch_is_one_line(bert_dirs, which, task, match):
    path = bert_dirs[0] if which == "encoder" else bert_dirs[1]
    with pytest.raises(ModelError, match=match) as err:
        load_model(path, task=task)
    assert "\n" not in str(err.value)


def test_classify_needs_a_sequence_classification_type(tmp_path):
    from transformers import CodeGenConfig

    CodeGenConfig(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB).save_pretrained(tmp_path)
    with pytest.raises(ModelError) as err:
        load_model(tmp_path, task="classify")
    assert str(err.value) == ("--task classify needs a model type with a sequence-classification head "
                              "(e.g. bert, llama, opt, gpt2); codegen has none")


def test_bad_task_settings_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="task 'regress' unknown"):
        load_model(tmp_path, task="regress")
    with pytest.raises(ConfigError, match="for --task classify"):
        load_model(tmp_path, task="lm", num_labels=3)
    with pytest.raises(ConfigError, match="disagrees"):
        load_model(tmp_path, num_labels=3, label_names=["a", "b"])
    with pytest.raises(ConfigError, match="distinct"):
        load_model(tmp_path, label_names=["a", "a"])


def test_decoder_classifier_pads_with_eos_when_the_tokenizer_has_no_pad(tmp_path, tokenizer):
    torch.manual_seed(0)
    tiny_llama().save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    tokenizer_config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    tokenizer_config.update(pad_token=None, eos_token="[SEP]")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    model, tok = load_model(tmp_path, task="classify", num_labels=2)
    sep = tok.convert_tokens_to_ids("[SEP]")
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.pad_token_id == sep == tok.pad_token_id
    x = torch.tensor([[5, 6, 7, 8], [5, 6, sep, sep]])
    with torch.no_grad():
        logits = model(x).logits
        alone = model(x[1:, :2]).logits  # pooled at the last non-pad token: padding changes nothing
    assert logits.shape == (2, 2)
    torch.testing.assert_close(logits[1:], alone)


def test_embedded_encoder_classifies():
    names = ["a", "b", "c"]
    model, tok = load_model("encoder", label_names=names)  # the embedded MiniLM; task classify implied
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.hidden_size == 384
    assert len(get_adapter(model).blocks) == 6 and model.config.id2label == dict(enumerate(names))
    batch = tok(["The Nile is a river in Africa.", "Chess is a board game."], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 3)
    default, _ = load_model(task="classify", num_labels=2)  # no source + classify = the embedded encoder too
    assert default.config.num_labels == 2 and default.config.hidden_size == 384
    assert torch.equal(default.bert.embeddings.word_embeddings.weight, model.bert.embeddings.word_embeddings.weight)


def test_a_new_classifier_head_is_left_out_of_the_model_fingerprint(bert_dirs):
    """A resumed run re-creates the head with any seed (the checkpoint restores it): it must still match."""
    from sparseforge.train.trainer import model_fingerprint

    encoder_dir, classifier_dir, _ = bert_dirs
    loaded = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        loaded.append(load_model(encoder_dir, task="classify", num_labels=3)[0])
    a, b = loaded
    assert not torch.equal(a.classifier.weight, b.classifier.weight)
    assert model_fingerprint(a) == model_fingerprint(b)
    saved = load_model(classifier_dir)[0]  # its head was saved: it counts
    before = model_fingerprint(saved)
    with torch.no_grad():
        saved.classifier.weight.mul_(2)
    assert model_fingerprint(saved) != before
