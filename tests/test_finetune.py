"""Recovery fine-tuning end to end: API, CLI, saved checkpoints, the chained prune -> SPP run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from sparseforge import load_model, prune, save
from sparseforge.cli import main
from sparseforge.peft import zero_masks
from sparseforge.recovery import finetune

TRAIN = ["--seq-len", "32", "--batch-size", "2", "--eval-windows", "2", "--steps", "3"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """Real English, small enough to tokenise in a blink: the first wiki training articles."""
    from sparseforge.data import wiki_documents

    path = tmp_path_factory.mktemp("text") / "wiki.txt"
    path.write_text("\n\n".join(wiki_documents("train")[:40]))
    return path


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("pruned") / "model"
    assert main(["prune", "--model", str(tiny_dir), "--method", "wanda", "--sparsity", "0.5", "--seq-len", "32",
                 "--n-calib", "4", "--no-eval", "--output", str(out)]) == 0
    return out


def test_api_spp_keeps_the_pattern_and_saves_a_plain_checkpoint(tmp_path, pruned_dir):
    model, tokenizer = load_model(pruned_dir)
    masks = zero_masks(model)
    report = finetune(model, tokenizer, steps=4, seq_len=32, batch_size=2, eval_windows=2, lr=1e-2, progress=False)
    assert report.pattern["identical"] and report.pattern["zeros_before"] > 0
    assert all(torch.equal(masks[n], m) for n, m in zero_masks(model).items())
    assert report.perplexity_after["perplexity"] != report.perplexity_before["perplexity"]
    assert len(report.history) == 4 and report.trainable["trainable"] > 0
    assert not any("alpha" in n or "beta" in n for n, _ in model.named_parameters())  # merged out
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    save(model, tokenizer, tmp_path / "spp", metadata=report.to_dict())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "spp")  # vanilla transformers, no sparseforge code
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-6, rtol=0)
    assert all(torch.equal(masks[n], m) for n, m in zero_masks(reloaded).items())


def test_cli_spp_with_adapter_and_json(tmp_path, pruned_dir, text_file, capsys):
    out, record = tmp_path / "spp", tmp_path / "r.json"
    assert main(["finetune", "--model", str(pruned_dir), *TRAIN, "--data", str(text_file), "--output", str(out), "--save-adapter",
                 "--json", str(record)]) == 0
    text = capsys.readouterr().out
    assert "zero pattern identical" in text and "perplexity  before" in text
    meta = json.loads((out / "sparseforge.json").read_text())
    assert meta["metrics"]["pattern_identical"] is True
    assert meta["pruning"]["config"]["method"] == "wanda"  # the input's pruning record is carried over
    assert meta["finetune"]["trainable"]["per_mille"] > 0
    assert json.loads(record.read_text())["finetune"]["method"] == "spp"
    from safetensors.torch import load_file

    adapter = load_file(out / "adapter.safetensors")
    assert adapter and all(k.endswith((".alpha", ".beta")) for k in adapter)


def test_cli_chained_prune_then_lora_star(tmp_path, tiny_dir, text_file, capsys):
    out = tmp_path / "chain"
    assert main(["finetune", "--model", str(tiny_dir), "--prune", "sparsegpt", "--pattern", "2:4",
                 "--n-calib", "4", "--method", "lora-star", *TRAIN, "--data", str(text_file), "--output", str(out)]) == 0
    out_text = capsys.readouterr().out
    assert "pruned with sparsegpt 2:4" in out_text and "perplexity  dense" in out_text
    meta = json.loads((out / "sparseforge.json").read_text())
    assert meta["metrics"]["pattern_identical"] and meta["pruning"]["config"]["pattern"] == "2:4"
    assert main(["info", str(out)]) == 0
    assert "2:4" in capsys.readouterr().out


def test_plain_lora_fills_the_zeros_and_says_so(tmp_path, pruned_dir, text_file, capsys):
    assert main(["finetune", "--model", str(pruned_dir), "--method", "lora", *TRAIN, "--no-eval", "--data", str(text_file)]) == 0
    assert "zero pattern CHANGED" in capsys.readouterr().out


def test_cli_resume_continues_from_the_checkpoint(tmp_path, pruned_dir, text_file, capsys):
    ckpt = tmp_path / "ckpt"
    args = ["finetune", "--model", str(pruned_dir), "--seq-len", "32", "--batch-size", "2", "--no-eval",
            "--data", str(text_file),
            "--checkpoint-every", "2", "--checkpoint-dir", str(ckpt)]
    assert main(args + ["--steps", "4"]) == 0
    assert (ckpt / "step-0000002").is_dir() and (ckpt / "step-0000004").is_dir()
    shutil.rmtree(ckpt / "step-0000004")  # as if the run had stopped after step 2
    assert main(args + ["--steps", "4", "--resume", "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["finetune"]["resumed_from"] == 2


@pytest.mark.parametrize("extra, fragment", [
    (["--sparsity", "0.5"], "need --prune"),
    (["--method", "dora"], "unknown"),
    (["--steps", "0"], "--steps: 0 must be at least 1"),
    (["--resume"], "--resume needs"),
    (["--targets", "nope_proj"], "not in the blocks"),
    (["--data", "/no/such/file.txt"], "not found"),
    (["--scale", "0"], "--scale: 0 is outside (0, inf]"),
    (["--lora-alpha", "-1", "--method", "lora-star"], "--lora-alpha: -1 is outside"),
    (["--weight-decay", "-1"], "--weight-decay: -1 is outside [0, inf]"),
    (["--mixed-precision", "fp16"], "bf16 on CPU"),
    (["--prune", "wanda", "--targets", "nope_proj"], "not in the blocks"),
])
def test_finetune_errors(capsys, pruned_dir, extra, fragment):
    assert main(["finetune", "--model", str(pruned_dir), "--seq-len", "32", "--no-eval", *extra]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("sparseforge: error:")]
    assert len(lines) == 1 and fragment in lines[0], err


def test_nothing_written_on_error(tmp_path, pruned_dir):
    out = tmp_path / "never"
    assert main(["finetune", "--model", str(pruned_dir), "--seq-len", "32", "--no-eval", "--targets", "nope_proj",
                 "--output", str(out)]) == 2
    assert not out.exists()


def test_prune_api_then_finetune_api_chain(tiny_dir, text_file):
    model, tokenizer = load_model(tiny_dir)
    prune(model, tokenizer, method="magnitude", sparsity=0.6, progress=False)
    report = finetune(model, tokenizer, method="lora-star", steps=2, seq_len=32, batch_size=2, evaluate=False,
                      data=str(text_file), progress=False)
    assert report.pattern["identical"] and report.perplexity_after is None
