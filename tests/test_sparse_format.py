"""Sparse checkpoints: the compressed-tensors codec (bitmask, packed 2:4) bit-exact, its sizes by hand,
directories that sparseforge writes and that llm-compressor wrote, and one-line errors for damaged files."""

import json
import math
import shutil

import numpy
import pytest
import torch
from safetensors.torch import load_file, save_file

from sparseforge import load_model, prune, save
from sparseforge.errors import ConfigError, ModelError
from sparseforge.sparse_format import (
    BITMASK,
    PACKED_24,
    CompressedTensorError,
    bitmask_bytes,
    compress_24,
    compress_bitmask,
    decompress,
    pack_mask,
    packed_24_bytes,
    packs_24,
    unpack_mask,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype]))


def unstructured(rows, columns, dtype, density=0.4, seed=0):
    """Random weights with random zeros, one all-zero row, one row without zeros and a -0.0."""
    weight = torch.randn(rows, columns, generator=gen(seed)).to(dtype)
    weight = weight.masked_fill(torch.rand(rows, columns, generator=gen(seed + 1)) > density, 0)
    weight[0] = 0
    weight[1] = (torch.randn(columns, generator=gen(seed + 2)).abs() + 1).to(dtype)
    weight[2, 0] = -0.0
    return weight


def two_four(rows, columns, dtype, seed=0):
    """2 of every 4 kept (random positions), plus a group with one non-zero and one with none."""
    weight = torch.randn(rows, columns, generator=gen(seed)).to(dtype)
    keep = torch.rand(rows, columns // 4, 4, generator=gen(seed + 1)).argsort(-1) < 2
    weight = weight.reshape(rows, -1, 4).masked_fill(~keep, 0).reshape(rows, columns)
    weight[0, 0:4] = torch.tensor([0, 0, 0, 5], dtype=dtype)
    weight[1, 4:8] = 0
    return weight


# ---------------------------------------------------------------- the mask's bits


def test_mask_bits_are_little_endian_per_row_by_hand():
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, [0, 8, 9]] = True  # byte 0 bit 0; byte 1 bits 0 and 1
    mask[1, 7] = True  # byte 0 bit 7
    assert pack_mask(mask).tolist() == [[1, 3], [128, 0]]
    assert torch.equal(unpack_mask(pack_mask(mask), 10), mask)


def test_mask_bits_match_numpy_packbits_little():
    mask = torch.rand(7, 45, generator=gen(0)) > 0.5
    ours = pack_mask(mask)
    assert ours.dtype == torch.uint8
    assert numpy.array_equal(ours.numpy(), numpy.packbits(mask.numpy(), axis=-1, bitorder="little"))
    assert torch.equal(unpack_mask(ours.view(torch.int8), 45), mask)  # int8 storage reads the same


# ---------------------------------------------------------------- codec round trips


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("columns", [13, 64])
def test_bitmask_round_trip_is_bit_exact(dtype, columns):
    weight = unstructured(6, columns, dtype)
    parts = compress_bitmask(weight)
    stored = (weight.view(INT_VIEW[dtype]) != 0)
    assert parts["compressed"].dtype == dtype and parts["compressed"].shape == (int(stored.sum()),)
    assert parts["bitmask"].shape == (6, math.ceil(columns / 8)) and parts["bitmask"].dtype == torch.uint8
    counts = stored.sum(-1)
    assert parts["row_offsets"].tolist() == [int(counts[:r].sum()) for r in range(6)]
    assert parts["row_offsets"].dtype == torch.int64 and parts["shape"].tolist() == [6, columns]
    assert counts[0] == 0 and counts[1] == columns  # the all-zero row and the row without zeros
    assert same_bits(decompress(parts, BITMASK), weight)  # -0.0 included


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_24_round_trip_is_bit_exact(dtype):
    weight = two_four(5, 16, dtype)
    assert packs_24(weight)
    parts = compress_24(weight)
    assert set(parts) == {"compressed", "bitmask", "shape"}
    assert parts["compressed"].shape == (5, 8) and parts["shape"].shape == (2, 1)
    assert parts["shape"].reshape(-1).tolist() == [5, 16]
    groups = unpack_mask(parts["bitmask"], 16).reshape(5, 4, 4)
    assert groups.sum(-1).eq(2).all()  # exactly two slots per group, zeros filling the sparse groups
    assert groups[0, 0].tolist() == [True, False, False, True]  # the lone non-zero and the first zero
    assert same_bits(decompress(parts, PACKED_24), weight)


def test_what_packs_24():
    weight = two_four(2, 8, torch.float32)
    assert packs_24(weight) and packs_24(torch.zeros(3, 8))
    weight[0, 0:3] = 1.0  # three non-zeros in a group
    assert not packs_24(weight) and not packs_24(torch.ones(2, 6)) and not packs_24(torch.zeros(8))
    with pytest.raises(ValueError, match="compress_bitmask"):
        compress_24(weight)


def test_sizes_by_hand_equal_the_tensors():
    # 4 x 16 bf16 with 32 stored: 64 bytes of values + 4 rows x 2 mask bytes + 4 x 8 offset bytes + 16 shape bytes
    assert bitmask_bytes(4, 16, 32, 2) == 64 + 8 + 32 + 16
    assert packed_24_bytes(4, 16, 2) == 64 + 8 + 16

    def nbytes(parts):
        return sum(t.numel() * t.element_size() for t in parts.values())

    weight = unstructured(6, 13, torch.bfloat16)
    assert nbytes(compress_bitmask(weight)) == bitmask_bytes(6, 13, int((weight.view(torch.int16) != 0).sum()), 2)
    weight = two_four(5, 16, torch.float16)
    assert nbytes(compress_bitmask(weight)) == bitmask_bytes(5, 16, int((weight.view(torch.int16) != 0).sum()), 2)
    assert nbytes(compress_24(weight)) == packed_24_bytes(5, 16, 2)


@pytest.mark.parametrize("damage, fragment", [
    (lambda p: p.update(compressed=p["compressed"][:-1]), "set bits but"),
    (lambda p: p["bitmask"].__setitem__((0, 0), p["bitmask"][0, 0] ^ 1), "set bits but"),
    (lambda p: p.update(bitmask=p["bitmask"][:, :-1]), "its bitmask is"),
    (lambda p: p.update(shape=torch.tensor([6, 40])), "its bitmask is"),
    (lambda p: p.update(shape=torch.tensor([6.0, 13.0])), "not integers"),
    (lambda p: p.update(row_offsets=p["row_offsets"] + 1), "row_offsets"),
    (lambda p: p.pop("row_offsets"), "row_offsets is missing"),
])
def test_damaged_bitmask_tensors_are_named(damage, fragment):
    parts = compress_bitmask(unstructured(6, 13, torch.float32))
    damage(parts)
    with pytest.raises(CompressedTensorError, match=fragment):
        decompress(parts, BITMASK)


def test_damaged_24_tensors_are_named():
    parts = compress_24(two_four(4, 8, torch.float32))
    short = dict(parts, compressed=parts["compressed"][:, :3])
    with pytest.raises(CompressedTensorError, match="set bits but"):
        decompress(short, PACKED_24)
    moved = dict(parts, bitmask=pack_mask(torch.ones(4, 8, dtype=torch.bool) & (torch.arange(8) < 4)))
    with pytest.raises(CompressedTensorError, match="exactly 2 bits"):
        decompress(moved, PACKED_24)


# ---------------------------------------------------------------- directories


def pruned(tiny_dir, pattern, dtype="float32"):
    model, tokenizer = load_model(tiny_dir, dtype=dtype)
    prune(model, tokenizer, method="magnitude", pattern=pattern, calibration=torch.zeros(1, 8, dtype=torch.long),
          progress=False)
    return model, tokenizer


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
        if sa[key].is_floating_point():
            assert same_bits(sa[key], sb[key]), key


@pytest.mark.parametrize("pattern, layout", [("0.5", BITMASK), ("2:4", PACKED_24)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sparse_save_loads_back_bit_exact(tiny_dir, tmp_path, pattern, layout, dtype):
    model, tokenizer = pruned(tiny_dir, pattern, dtype)
    out = save(model, tokenizer, tmp_path / "sparse", metadata={"note": 1}, save_format="sparse-bitmask")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    sparsity = config["sparsity_config"]
    assert sparsity["format"] == layout and sparsity["global_sparsity"] == pytest.approx(0.5)
    assert sparsity["sparsity_structure"] == ("2:4" if layout == PACKED_24 else "unstructured")
    assert len(sparsity["targets"]) == 14 and "model.layers.1.mlp.down_proj" in sparsity["targets"]
    keys = set(load_file(out / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.compressed" in keys and "model.layers.0.self_attn.q_proj.weight" not in keys
    assert ("model.layers.0.self_attn.q_proj.row_offsets" in keys) == (layout == BITMASK)
    assert "model.embed_tokens.weight" in keys and "model.norm.weight" in keys  # never compressed
    meta = json.loads((out / "sparseforge.json").read_text())
    assert meta["note"] == 1 and meta["save_format"]["format"] == layout and meta["save_format"]["compressed_weights"] == 14
    reloaded, _ = load_model(out, dtype=dtype)
    assert_same_state(model, reloaded)
    assert not hasattr(reloaded.config, "quantization_config")  # dense in memory; a later save is a plain one


def tensor_bytes(path):
    data = path.read_bytes()
    return len(data) - 8 - int.from_bytes(data[:8], "little")


def test_size_against_the_dense_file_is_half_plus_a_sixteenth_plus_offsets(tmp_path):
    """A model whose block linears are nearly all of it: at 50% in bfloat16 the compressed weights take
    0.5 (values) + 1/16 (mask) + 4/columns (int64 row offsets) of their dense bytes; the file adds its header."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    prune(model, None, method="magnitude", pattern="0.5", calibration=torch.zeros(1, 8, dtype=torch.long), progress=False)
    dense = save(model, None, tmp_path / "dense")
    sparse = save(model, None, tmp_path / "sparse", save_format="sparse-bitmask")
    dense_size, sparse_size = ((p / "model.safetensors").stat().st_size for p in (dense, sparse))
    linears = {n: p for n, p in model.named_parameters() if n.endswith("proj.weight")}
    linear_bytes = sum(p.numel() * 2 for p in linears.values())
    expected = sum(bitmask_bytes(*p.shape, int(p.count_nonzero()), 2) for p in linears.values())
    # the tensor bytes exactly: a safetensors file is an 8-byte header length, the JSON header, then the tensors
    assert tensor_bytes(sparse / "model.safetensors") == tensor_bytes(dense / "model.safetensors") - linear_bytes + expected
    ratio = (tensor_bytes(sparse / "model.safetensors") - tensor_bytes(dense / "model.safetensors") + linear_bytes) / linear_bytes
    offsets = sum(8 * p.shape[0] for p in linears.values()) / linear_bytes
    assert 0.5 + 1 / 16 + offsets < ratio < 0.5 + 1 / 16 + offsets + 0.0005  # + the 16-byte shape tensors
    assert sparse_size / dense_size < 0.62  # the whole file: block linears are ~98% of this model


def test_nothing_to_compress_saves_dense(tiny_dir, tmp_path):
    model, tokenizer = load_model(tiny_dir)
    out = save(model, tokenizer, tmp_path / "out", save_format="sparse-bitmask")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert json.loads((out / "sparseforge.json").read_text())["save_format"]["format"] == "dense"
    with pytest.raises(ConfigError, match="choose from dense, sparse-bitmask"):
        save(model, tokenizer, tmp_path / "x", save_format="sparse")


def test_compact_losparse_layers_compress_their_sparse_rows(tiny_dir, tmp_path):
    """A compact model (structure manifest) works: S's kept rows are compressed, U and V stay dense."""
    from sparseforge.lowrank.layers import CompactLoSparseLinear
    from sparseforge.models.modules import replace_module

    model, tokenizer = load_model(tiny_dir)
    rows = torch.rand(10, 64, generator=gen(0)).masked_fill(torch.rand(10, 64, generator=gen(1)) < 0.7, 0)
    layer = CompactLoSparseLinear(torch.randn(128, 4, generator=gen(2)), torch.randn(4, 64, generator=gen(3)), rows,
                                  torch.arange(0, 128, 13)[:10])
    replace_module(model, "model.layers.0.mlp.up_proj", layer)
    out = save(model, tokenizer, tmp_path / "compact", metadata={},
               save_format="sparse-bitmask")
    keys = set(load_file(out / "model.safetensors"))
    assert "model.layers.0.mlp.up_proj.sparse_rows.compressed" in keys and "model.layers.0.mlp.up_proj.lowrank_u" in keys
    reloaded, _ = load_model(out)
    assert isinstance(reloaded.model.layers[0].mlp.up_proj, CompactLoSparseLinear)
    assert_same_state(model, reloaded)


# ---------------------------------------------------------------- written as llm-compressor wrote them


def ct_bitmask(tensor):
    """compressed-tensors' sparse-bitmask tensors, computed as its code did (value != 0, numpy packbits)."""
    mask = tensor != 0
    counts = mask.sum(dim=-1)
    return {"compressed": tensor[mask], "bitmask": torch.from_numpy(numpy.packbits(mask.numpy(), axis=-1, bitorder="little")),
            "row_offsets": torch.cumsum(counts, 0) - counts, "shape": torch.tensor(list(tensor.shape))}


def ct_24(tensor):
    mask = torch.zeros_like(tensor, dtype=torch.bool).reshape(-1, 4)
    mask.scatter_(1, tensor.reshape(-1, 4).abs().topk(2, dim=1).indices, True)
    mask = mask.reshape(tensor.shape)
    return {"compressed": tensor[mask].reshape(tensor.shape[0], -1),
            "bitmask": torch.from_numpy(numpy.packbits(mask.numpy(), axis=-1, bitorder="little")),
            "shape": torch.tensor(list(tensor.shape)).reshape(-1, 1)}


def hand_built(tiny_dir, model, out, layout, naming, where):
    """A directory as llm-compressor saved it: ``naming`` "module" (newer: up_proj.compressed, the block linears
    only) or "weight" (older: up_proj.weight.compressed, every tensor, 1-D norms included)."""
    shutil.copytree(tiny_dir, out)
    (out / "model.safetensors").unlink()
    state = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().clone().contiguous()
        linear = key.endswith("proj.weight")
        if naming == "weight" or linear:
            parts = (ct_24 if layout == PACKED_24 and linear else ct_bitmask)(tensor)
            prefix = key[: -len(".weight")] if naming == "module" else key
            state.update({f"{prefix}.{part}": value for part, value in parts.items()})
        else:
            state[key] = tensor
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    sparsity = {"format": layout, "global_sparsity": 0.5, "registry_requires_subclass": False,
                "sparsity_structure": "2:4" if layout == PACKED_24 else "unstructured", "targets": ["Linear"],
                "ignore": ["lm_head"]}
    if where == "quantization_config":
        config["quantization_config"] = {"quant_method": "compressed-tensors", "version": "0.9.1", "format": "dense",
                                         "sparsity_config": sparsity, "transform_config": {}}
    elif where == "compression_config":
        config["compression_config"] = {"sparsity_config": sparsity, "version": "0.4.0"}
    else:
        config["sparsity_config"] = sparsity
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("layout, pattern, naming, where", [
    (BITMASK, "0.5", "module", "quantization_config"),
    (PACKED_24, "2:4", "module", "quantization_config"),
    (BITMASK, "0.5", "weight", "compression_config"),
    (PACKED_24, "2:4", "module", "sparsity_config"),
])
def test_a_compressed_tensors_directory_loads(tiny_dir, tmp_path, layout, pattern, naming, where):
    model, _ = pruned(tiny_dir, pattern)
    out = hand_built(tiny_dir, model, tmp_path / "ct", layout, naming, where)
    reloaded, _ = load_model(out)
    assert_same_state(model, reloaded)


def test_quantized_and_unknown_formats_are_refused(tiny_dir, tmp_path):
    model, _ = pruned(tiny_dir, "0.5")
    out = hand_built(tiny_dir, model, tmp_path / "ct", BITMASK, "module", "quantization_config")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["config_groups"] = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4}}}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="quantized compressed-tensors checkpoint"):
        load_model(out)
    del config["quantization_config"]["config_groups"]
    config["quantization_config"]["sparsity_config"]["format"] = "marlin-24"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="'marlin-24', which sparseforge does not read"):
        load_model(out)


# ---------------------------------------------------------------- damaged files: one line naming file and tensor


def rewrite(path, change):
    state = load_file(path)
    change(state)
    save_file(state, path, metadata={"format": "pt"})


STEM = "model.layers.1.mlp.down_proj"


@pytest.mark.parametrize("change, fragment", [
    (lambda s: s.update({f"{STEM}.compressed": s[f"{STEM}.compressed"][:-5]}), "set bits but"),
    (lambda s: s[f"{STEM}.bitmask"].__setitem__((3, 2), s[f"{STEM}.bitmask"][3, 2] ^ 16), "set bits but"),
    (lambda s: s.update({f"{STEM}.shape": torch.tensor([64, 64])}), "its bitmask is"),
    (lambda s: s.pop(f"{STEM}.bitmask"), "bitmask is missing"),
])
def test_damaged_compressed_tensors_are_one_line(tiny_dir, tmp_path, change, fragment):
    model, tokenizer = pruned(tiny_dir, "0.5")
    out = save(model, tokenizer, tmp_path / "sparse", save_format="sparse-bitmask")
    rewrite(out / "model.safetensors", change)
    with pytest.raises(ModelError) as error:
        load_model(out)
    message = str(error.value)
    assert "\n" not in message and fragment in message, message
    assert str(out / "model.safetensors") in message and STEM in message and "save the model again" in message


def test_shape_that_does_not_fit_the_model_and_truncated_file(tiny_dir, tmp_path):
    model, tokenizer = pruned(tiny_dir, "0.5")
    out = save(model, tokenizer, tmp_path / "sparse", save_format="sparse-bitmask")
    weights = out / "model.safetensors"
    other = compress_bitmask(torch.eye(128, 128)[:, :64].clone())  # a valid (128, 64) weight where (64, 128) belongs
    rewrite(weights, lambda s: s.update({f"{STEM}.{k}": v for k, v in other.items()}))
    with pytest.raises(ModelError, match=rf"{STEM} in {weights} has shape \(128, 64\), but the model's {STEM}.weight is "
                                         r"\(64, 128\)"):
        load_model(out)
    out = save(model, tokenizer, tmp_path / "sparse", save_format="sparse-bitmask", overwrite=True)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelError, match="truncated"):
        load_model(out)


def test_transpa_free_layout_with_pruned_zeros_round_trips(tiny_dir, tmp_path):
    """A TranSpa free-layout model (compact attention, shrunk linears) then pruned: its zeros compress, it reloads."""
    from transformers import AutoTokenizer

    from sparseforge.models.modules import block_linears, structure_manifest
    from sparseforge.structured import manifest_includes
    from test_transpa import logits, run

    model, *_ = run(layout="free")
    for module in block_linears(model).values():
        with torch.no_grad():
            module.weight.masked_fill_(module.weight.abs() < module.weight.abs().median(), 0)
    manifest = structure_manifest(model, include=manifest_includes(model))
    out = save(model, AutoTokenizer.from_pretrained(tiny_dir), tmp_path / "free", metadata={"structure": manifest},
               save_format="sparse-bitmask")
    assert json.loads((out / "sparseforge.json").read_text())["save_format"]["compressed_weights"] == 14
    loaded, _ = load_model(out)
    assert_same_state(model, loaded)
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)


def test_announced_format_reads_only_known_places_and_names(tmp_path):
    from sparseforge.sparse_checkpoint import announced_format

    ct = {"quant_method": "compressed-tensors"}
    assert announced_format({}, tmp_path) is None
    assert announced_format({"quantization_config": {"quant_method": "gptq", "bits": 4}}, tmp_path) is None
    assert announced_format({"sparsity_config": {"block": 4}}, tmp_path) is None  # a model's own field
    assert announced_format({"quantization_config": ct}, tmp_path) == "dense"
    assert announced_format({"quantization_config": {**ct, "sparsity_config": {"format": BITMASK}}}, tmp_path) == BITMASK
    assert announced_format({"compression_config": {"sparsity_config": {"format": PACKED_24}}}, tmp_path) == PACKED_24
    with pytest.raises(ModelError, match="quantized"):
        announced_format({"compression_config": {"quantization_config": {"config_groups": {}}}}, tmp_path)
    with pytest.raises(ModelError, match="'os.system', which sparseforge does not read"):
        announced_format({"quantization_config": {**ct, "sparsity_config": {"format": "os.system"}}}, tmp_path)
