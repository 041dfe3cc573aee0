"""The CLI: every documented bad input gives exit 2 and a one-line message naming the fix."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import GPTNeoConfig, GPTNeoForCausalLM

from sparseforge.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_error(capsys, argv, fragment):
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("sparseforge: error:")]
    assert len(lines) == 1 and fragment in lines[0], err


def test_parsing_imports_no_torch():
    """The CLI takes its choices from sparseforge.options, so --help and bad flags answer without loading torch."""
    code = "import sys, sparseforge.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_help_works(capsys):
    for argv in (["--help"], ["prune", "--help"], ["eval", "--help"], ["info", "--help"]):
        assert main(argv) == 0
    assert "1:4" in capsys.readouterr().out  # the N:M convention, with its worked example


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--sparsity", "1.2"], "outside [0, 1)"),
        (["--sparsity", "-0.1"], "outside [0, 1)"),
        (["--pattern", "4:2"], "need 1 <= N < M"),
        (["--pattern", "0:4"], "need 1 <= N < M"),
        (["--pattern", "2-4"], "malformed"),
        (["--pattern", "2:48"], "not a multiple of M=48"),
        (["--method", "obs"], "unknown method 'obs'"),
        (["--seq-len", "1024"], "exceeds the model's context of 256"),
        (["--calib", "/nonexistent/text.txt"], "not found"),
    ],
)
def test_prune_errors(capsys, tiny_dir, extra, fragment):
    assert_error(capsys, ["prune", "--model", str(tiny_dir), "--no-eval", "--n-calib", "2", "--seq-len", "16",
                          *extra], fragment)


def test_missing_model_and_unknown_architecture(capsys, tmp_path):
    assert_error(capsys, ["prune", "--model", "/nonexistent/model", "--no-eval"], "not found")
    assert_error(capsys, ["eval", "--model", str(tmp_path / "none.gguf")], "not found")
    GPTNeoForCausalLM(GPTNeoConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, attention_types=[[["global"], 2]],
                                   max_position_embeddings=64)).save_pretrained(tmp_path / "neo")
    assert_error(capsys, ["prune", "--model", str(tmp_path / "neo"), "--no-eval"], "add an adapter")


def test_empty_and_short_text(capsys, tiny_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_error(capsys, ["prune", "--model", str(tiny_dir), "--no-eval", "--calib", str(empty), "--seq-len", "64"],
                 "holds no text")
    short = tmp_path / "short.txt"
    short.write_text("Just a few words.")
    assert_error(capsys, ["prune", "--model", str(tiny_dir), "--no-eval", "--calib", str(short), "--seq-len", "64"],
                 "fewer than one window")


def test_non_finite_activations_name_the_layer(capsys, tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(tmp_path / "nan")
    assert_error(capsys, ["prune", "--model", str(tmp_path / "nan"), "--no-eval", "--n-calib", "2", "--seq-len", "16"],
                 "model.layers.1.mlp.gate_proj")


def test_prune_eval_info_end_to_end(capsys, tiny_dir, tmp_path):
    out = tmp_path / "pruned"
    code, stdout, err = run(capsys, "prune", "--model", str(tiny_dir), "--method", "wanda", "--pattern", "2:4",
                            "--n-calib", "4", "--seq-len", "32", "--eval-windows", "2", "--output", str(out),
                            "--json", str(tmp_path / "r.json"), "--low-memory")
    assert code == 0, err
    assert "perplexity  dense" in stdout and "sparsity 0.5000" in stdout
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["metrics"]["pruned"]["n_windows"] == 2
    config = json.loads((out / "sparseforge.json").read_text())["pruning"]["config"]
    assert config["method"] == "wanda" and config["low_memory"] is True
    assert_error(capsys, ["prune", "--model", str(tiny_dir), "--no-eval", "--output", str(out)], "--overwrite")

    code, stdout, _ = run(capsys, "eval", "--model", str(out), "--seq-len", "32", "--eval-windows", "2")
    assert code == 0
    assert json.loads(stdout.splitlines()[-1])["perplexity"] == pytest.approx(results["metrics"]["pruned"]["perplexity"])

    code, stdout, _ = run(capsys, "info", str(out), "--layers", "--json", str(tmp_path / "info.json"))
    assert code == 0
    assert "50.00% zeros in 14 layers" in stdout and "2:4" in stdout and "pruned with wanda" in stdout
    info = json.loads((tmp_path / "info.json").read_text())
    assert all(layer["pattern"] == "2:4" for layer in info["layers"])
    assert_error(capsys, ["info", str(tmp_path / "missing")], "not found")


def test_hub_id_missing_from_cache(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert_error(capsys, ["eval", "--model", "some-org/not-cached-model"], "not in the local Hugging Face cache")


def test_gguf_file_is_a_model_source(capsys, smol_dir):
    from sparseforge.assets import embedded_model_gguf

    code, stdout, err = run(capsys, "eval", "--model", str(embedded_model_gguf()), "--seq-len", "32",
                            "--eval-windows", "1")
    assert code == 0, err
    assert json.loads(stdout.splitlines()[-1])["n_windows"] == 1


def test_json_beside_a_new_output_directory(capsys, tiny_dir, tmp_path):
    """The README's demo: --output out/m --json out/m.json on a machine with no out/ yet."""
    out = tmp_path / "out" / "deeper"
    code, _, err = run(capsys, "prune", "--model", str(tiny_dir), "--method", "magnitude", "--no-eval",
                       "--output", str(out / "m"), "--json", str(out / "m.json"))
    assert code == 0, err
    assert (out / "m" / "config.json").is_file() and json.loads((out / "m.json").read_text())["pruning"]
    # a --json in a missing directory the save does not create is still refused before any work
    assert_error(capsys, ["prune", "--model", str(tiny_dir), "--no-eval", "--output", str(tmp_path / "o2"),
                          "--json", str(tmp_path / "elsewhere" / "r.json")], "does not exist")
    assert not (tmp_path / "o2").exists()


def test_sparse_bitmask_save_and_export(capsys, tiny_dir, tmp_path):
    """prune --save-format sparse-bitmask loads back equal to the dense save; export --format dense gives a
    directory vanilla transformers loads with equal logits, and export --format sparse-bitmask goes back."""
    from transformers import AutoModelForCausalLM

    from sparseforge import load_model

    dense, sparse = tmp_path / "dense", tmp_path / "sparse"
    for out, fmt in ((dense, "dense"), (sparse, "sparse-bitmask")):
        code, stdout, err = run(capsys, "prune", "--model", str(tiny_dir), "--method", "magnitude", "--sparsity", "0.5",
                                "--no-eval", "--output", str(out), "--save-format", fmt)
        assert code == 0, err
    assert "sparse-bitmask: 14 weights compressed" in stdout and "sparseforge.load_model" in stdout
    assert "vanilla transformers cannot" in stdout
    expected, _ = load_model(dense)
    for key, value in load_model(sparse)[0].state_dict().items():
        assert torch.equal(value, expected.state_dict()[key]), key

    plain = tmp_path / "plain"
    code, stdout, err = run(capsys, "export", "--format", "dense", str(sparse), str(plain))
    assert code == 0, err
    assert "vanilla transformers loads it" in stdout
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(plain)(input_ids=ids).logits, expected(input_ids=ids).logits)
    meta = json.loads((plain / "sparseforge.json").read_text())
    assert meta["pruning"]["config"]["method"] == "magnitude" and "save_format" not in meta

    again = tmp_path / "again"
    code, stdout, err = run(capsys, "export", "--format", "sparse-bitmask", str(plain), str(again))
    assert code == 0, err
    assert (again / "model.safetensors").stat().st_size == (sparse / "model.safetensors").stat().st_size
    assert_error(capsys, ["export", "--format", "dense", str(sparse), str(plain)], "--overwrite")
    assert_error(capsys, ["export", "--format", "dense", str(sparse), str(sparse)], "is the input model")
    assert_error(capsys, ["export", "--format", "dense", str(tmp_path / "missing"), str(tmp_path / "x")], "not found")


def test_every_saving_command_takes_a_save_format():
    from sparseforge.cli import build_parser

    for command in ("prune", "finetune", "train"):
        assert build_parser().parse_args([command, "--save-format", "sparse-bitmask"]).save_format == "sparse-bitmask"
        assert build_parser().parse_args([command]).save_format == "dense"
