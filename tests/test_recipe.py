"""Recipes: `sparseforge run RECIPE.yaml` is the stages' commands run by hand, checked before anything runs."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparseforge import cli
from sparseforge.cli import main
from sparseforge.recipe import RecipeError, key_numbers, load_recipe, plan

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))

pytestmark = pytest.mark.usefixtures("one_thread")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("sparseforge: error:")]
    assert len(lines) == 1, err
    return lines[0]


def weights(directory: Path) -> dict:
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


TWO_STAGES = """\
seed: 0
stages:
  - prune: {method: magnitude, sparsity: 0.5, seq_len: 32, eval_windows: 2}
  - eval: {seq_len: 32, eval_windows: 2}
"""


# ---------------------------------------------------------------- the shipped recipes


def test_recipes_are_shipped():
    assert {p.name for p in RECIPES} >= {"sparsegpt-24-spp.yaml", "sparsellm-70.yaml", "wanda-50-spp.yaml",
                                         "losparse-encoder.yaml"}
    for path in RECIPES:  # a header saying what it reproduces and how long it takes
        header = path.read_text().split("\n\n")[0]
        assert header.startswith("#") and "Reproduces docs/results.md" in path.read_text() and "2 CPU cores" in header


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_checks_out_as_written(capsys, tmp_path, path):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "run", path, "--check", "--output", out)
    assert code == 0, err
    stages = load_recipe(path).stages
    assert stdout.count("sparseforge ") == len(stages) and f"all {len(stages)} stages check out" in stdout
    assert not out.exists()


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    """A tiny random BERT classifier with the embedded MiniLM tokenizer (the encoder recipe's model, shrunk; with a
    head, so that bench-speed loads it as a classifier as it does the embedded 'encoder')."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from sparseforge.assets import embedded_encoder_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_encoder_dir())
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-bert")
    BertForSequenceClassification(BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=128, max_position_embeddings=128,
                                             num_labels=2)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def topics_file(tmp_path_factory):
    words = {"food": "bread cheese apple soup pasta rice".split(), "sport": "ball goal team match player score".split()}
    rows = [{"text": " ".join(words[label][(i + j) % 6] for j in range(6)), "label": label}
            for i in range(40) for label in words]
    path = tmp_path_factory.mktemp("topics") / "topics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A little training text: the whole wiki split takes longer to tokenize than the tiny run takes."""
    from sparseforge.data import wiki_documents

    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text("\n\n".join(wiki_documents("train")[:10]))
    return path


def shrink(name: str, tiny_dir, tiny_bert_dir, topics_file, text_file=None) -> list[str]:
    """--set overrides that run a shipped recipe on a tiny model in seconds."""
    lm = [f"model={tiny_dir}", "defaults.seq_len=16", "defaults.eval_windows=2"]
    tune = ["finetune.steps=2", "finetune.batch_size=1", "finetune.mixed_precision=no", f"finetune.data={text_file}"]
    return {
        "sparsegpt-24-spp": lm + ["prune.n_calib=2"] + tune,
        "wanda-50-spp": lm + ["prune.n_calib=2"] + tune,
        "sparsellm-70": lm + ["prune.n_calib=2", "prune.iterations=1", "eval.eval_windows=2"],
        "losparse-encoder": [f"model={tiny_bert_dir}", f"train.data={topics_file}", "train.steps=4", "train.batch_size=4",
                             "train.seq_len=16", f"eval.data={topics_file}", "eval.seq_len=16",
                             "bench-speed.prefill_tokens=8", "bench-speed.batch_size=1", "bench-speed.repeats=1",
                             "bench-speed.warmup=0"],
    }[name]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_runs_on_a_tiny_model(capsys, tmp_path, tiny_dir, tiny_bert_dir, topics_file, text_file, path):
    out = tmp_path / "out"
    sets = [word for s in shrink(path.stem, tiny_dir, tiny_bert_dir, topics_file, text_file) for word in ("--set", s)]
    code, stdout, err = run(capsys, "run", path, "--output", out, *sets)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "done" and all(s["status"] == "done" for s in report["stages"])
    for stage in report["stages"]:
        assert stage["result"] is not None and Path(stage["json"]).is_file()
        if stage["output"]:
            assert (Path(stage["output"]) / "sparseforge.json").is_file()
    # each stage read the latest model an earlier stage made; bench-speed compares it with the recipe's input
    root = load_recipe(path, shrink(path.stem, tiny_dir, tiny_bert_dir, topics_file, text_file)).model
    latest = root
    for stage in report["stages"]:
        assert stage["model"] == ([root, latest] if stage["kind"] == "bench-speed" else latest)
        latest = stage["output"] or latest
    assert "| 01-" in (out / "report.md").read_text() and f"report: {out / 'report.md'}" in stdout


# ---------------------------------------------------------------- a recipe is its commands


def test_two_stage_recipe_equals_the_commands_by_hand(capsys, tmp_path, tiny_dir):
    recipe = write(tmp_path / "r.yaml", TWO_STAGES)
    code, _, err = run(capsys, "run", recipe, "--output", tmp_path / "out", "--set", f"model={tiny_dir}")
    assert code == 0, err
    hand = tmp_path / "hand"
    assert main(["prune", "--model", str(tiny_dir), "--method", "magnitude", "--sparsity", "0.5", "--seq-len", "32",
                 "--eval-windows", "2", "--seed", "0", "--output", str(hand), "--json", str(tmp_path / "hand.json")]) == 0
    assert main(["eval", "--model", str(hand), "--seq-len", "32", "--eval-windows", "2",
                 "--json", str(tmp_path / "hand-eval.json")]) == 0
    capsys.readouterr()

    recipe_weights, hand_weights = weights(tmp_path / "out" / "01-prune"), weights(hand)
    assert recipe_weights.keys() == hand_weights.keys() and len(hand_weights) > 10
    for name, tensor in hand_weights.items():
        assert torch.equal(recipe_weights[name], tensor), name
    by_hand = json.loads((tmp_path / "hand-eval.json").read_text())
    by_recipe = json.loads((tmp_path / "out" / "02-eval.json").read_text())
    assert by_recipe["perplexity"] == by_hand["perplexity"] and by_recipe["n_windows"] == 2
    pruned = json.loads((tmp_path / "hand.json").read_text())["metrics"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["stages"][0]["result"]["metrics"]["pruned"]["perplexity"] == pruned["pruned"]["perplexity"]
    assert report["stages"][1]["argv"] == ["eval", "--seq-len", "32", "--eval-windows", "2", "--model",
                                           str(tmp_path / "out" / "01-prune"), "--json", str(tmp_path / "out" / "02-eval.json")]
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"sparsity 0.5000; perplexity {pruned['dense']['perplexity']:.2f} → {pruned['pruned']['perplexity']:.2f}" in md
    assert f"perplexity {by_hand['perplexity']:.2f} | " in md


# ---------------------------------------------------------------- refused before anything runs


BAD = [
    ("stages:\n  - prune: {method: magnitude}\n  - eval: {seq_len: [1, 2}\n", "is not valid YAML"),
    ("stages:\n  - prune: {method: magnitude}\n  - evaluate: {}\n", "stage 2: unknown stage kind 'evaluate' (did you mean 'eval'?)"),
    ("stages:\n  - prune: {method: magnitude}\n  - finetune: {learning_rate: 1e-3}\n",
     "stage 2 (finetune): unknown setting 'learning-rate'"),
    ("stages:\n  - prune: {method: magnitude}\n  - finetune: {lr: -1}\n",
     "stage 2 (finetune): argument --lr: -1 is outside (0, inf], e.g. 1e-4"),
    ("stages:\n  - prune: {method: magnitude}\n  - export: {}\n",
     "stage 2 (export): the following arguments are required: --format"),
    ("stages:\n  - prune: {method: magnitude}\n  - prune: {pattern: '2:48'}\n", "stage 2 (prune): "),  # preflight: widths
    ("stages:\n  - prune: {method: magnitude}\n  - eval: {output: x}\n", "stage 2 (eval): 'output' is set by the recipe"),
    ("stages:\n  - prune: {method: magnitude}\n  - finetune: {no_eval: maybe}\n",
     "stage 2 (finetune): no-eval is a switch: write true or false"),
    ("stages:\n  - prune: {method: magnitude}\n  - finetune: {steps: 2, steps: 3}\n", "'steps' is given twice"),
    ("stages:\n  - prune: {method: magnitude}\n  - finetune: {mixed_precision: fp8}\n",
     "stage 2 (finetune): argument --mixed-precision: invalid choice: 'fp8'"),
    ("defaults: {keep: 0.2}\nstages:\n  - prune: {method: magnitude}\n  - eval\n", "defaults: 'keep' is a setting of no stage"),
    ("stage:\n  - prune: {}\n", "non-empty 'stages:' list"),
]


def forbid_running(monkeypatch, kinds=("prune", "finetune", "train", "eval", "bench-speed", "export", "info")):
    """The commands still check (the recipe's pre-run checks) but fail the test if a stage really runs."""
    for kind in kinds:
        command = cli.COMMANDS[kind]
        monkeypatch.setitem(cli.COMMANDS, kind, lambda args, command=command: command(args) if getattr(
            args, "check_only", False) else pytest.fail(f"a {args.command} stage ran"))


@pytest.mark.parametrize("text, fragment", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_a_bad_stage_is_refused_before_the_first_runs(capsys, tmp_path, tiny_dir, monkeypatch, text, fragment):
    forbid_running(monkeypatch)
    out = tmp_path / "out"
    code, _, err = run(capsys, "run", write(tmp_path / "r.yaml", text), "--output", out, "--set", f"model={tiny_dir}")
    assert code == 2, err
    assert fragment in error_line(err)
    assert not out.exists()


def test_a_pattern_that_does_not_fit_the_layers_is_the_commands_own_error(capsys, tmp_path, tiny_dir):
    _, _, by_hand = run(capsys, "prune", "--model", tiny_dir, "--pattern", "2:48", "--no-eval")
    recipe = write(tmp_path / "r.yaml", "stages:\n  - prune: {method: magnitude}\n  - prune: {pattern: '2:48'}\n")
    code, _, err = run(capsys, "run", recipe, "--output", tmp_path / "out", "--set", f"model={tiny_dir}")
    assert code == 2
    assert error_line(err) == error_line(by_hand).replace("error: ", "error: stage 2 (prune): ", 1)


def test_an_existing_output_directory_needs_overwrite(capsys, tmp_path, tiny_dir):
    recipe = write(tmp_path / "r.yaml", TWO_STAGES)
    out = tmp_path / "out"
    assert run(capsys, "run", recipe, "--output", out, "--set", f"model={tiny_dir}")[0] == 0
    code, _, err = run(capsys, "run", recipe, "--output", out, "--set", f"model={tiny_dir}")
    assert code == 2 and "--overwrite, or --from-stage N to resume" in error_line(err)
    (out / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "run", recipe, "--output", out, "--set", f"model={tiny_dir}", "--overwrite",
                       "--set", "1.sparsity=0.25")
    assert code == 0, err
    assert json.loads((out / "01-prune.json").read_text())["metrics"]["sparsity"] == pytest.approx(0.25, abs=0.01)
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite replaces the run's own files only


def test_no_output_directory_is_refused(capsys, tmp_path):
    code, _, err = run(capsys, "run", write(tmp_path / "r.yaml", "stages: [eval]\n"))
    assert code == 2 and "pass --output DIR" in error_line(err)


# ---------------------------------------------------------------- failure and resume


def test_a_failed_stage_keeps_the_finished_ones_and_resumes(capsys, tmp_path, tiny_dir, monkeypatch):
    text = tmp_path / "eval.txt"
    text.write_text("")  # empty: the eval stage fails when it reads it, after the checks
    recipe = write(tmp_path / "r.yaml", TWO_STAGES.replace("- eval: {seq_len: 32, eval_windows: 2}",
                                                         f"- eval: {{seq_len: 32, eval_windows: 2, data: {text}}}"))
    out = tmp_path / "out"
    code, _, err = run(capsys, "run", recipe, "--output", out, "--set", f"model={tiny_dir}")
    assert code == 2
    line = error_line(err)
    resume = f"sparseforge run {recipe} --output {out} --set model={tiny_dir} --from-stage 2"
    assert line.startswith("sparseforge: error: stage 2 (eval): ") and "holds no text" in line and line.endswith(resume)
    report = json.loads((out / "report.json").read_text())
    assert [s["status"] for s in report["stages"]] == ["done", "failed"] and report["resume"] == resume
    assert (out / "01-prune" / "sparseforge.json").is_file() and f"Resume: `{resume}`" in (out / "report.md").read_text()
    made = {p.name: p.stat().st_mtime_ns for p in (out / "01-prune").iterdir()}

    text.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    forbid_running(monkeypatch, ["prune"])
    code, _, err = run(capsys, *shlex.split(resume)[1:])
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert [s["status"] for s in report["stages"]] == ["done", "done"] and report["stages"][0]["reused"]
    assert report["stages"][1]["result"]["n_windows"] == 2
    assert {p.name: p.stat().st_mtime_ns for p in (out / "01-prune").iterdir()} == made

    # a finished stage's settings changed since its output was made: resume from it instead
    code, _, err = run(capsys, *shlex.split(resume)[1:], "--set", "1.sparsity=0.25")
    assert code == 2 and "stage 1 (prune)'s settings differ" in error_line(err) and "--from-stage 1" in error_line(err)
    code, _, err = run(capsys, "run", recipe, "--output", tmp_path / "elsewhere", "--from-stage", "2")
    assert code == 2 and "report.json not found" in error_line(err)
    code, _, err = run(capsys, *shlex.split(resume)[1:-1], "3")
    assert code == 2 and "the recipe has 2 stages" in error_line(err)


# ---------------------------------------------------------------- settings -> command lines


def test_settings_become_the_commands_flags(tmp_path):
    recipe = write(tmp_path / "r.yaml", """\
model: base
seed: 3
defaults: {seq_len: 64, n_calib: 8}
stages:
  - prune:
      method: sparsegpt
      pattern: 2:4                # YAML 1.1 would read 124 (base 60): recipes keep the text
      skip: ["model.layers.0.*", "*.down_proj"]
      no_eval: true
      propagate: ~
  - finetune: {targets: [q_proj, v_proj], n_calib: 4, no_eval: false}
  - eval
  - export: {format: sparse-bitmask}
  - info: {layers: true}
""")
    stages = plan(load_recipe(recipe, ["finetune.steps=5", "defaults.eval_windows=3"]), tmp_path / "o")
    o = str(tmp_path / "o")
    assert [s.argv for s in stages] == [
        ["prune", "--seq-len", "64", "--n-calib", "8", "--eval-windows", "3", "--seed", "3", "--method", "sparsegpt",
         "--pattern", "2:4", "--skip", "model.layers.0.*", "--skip", "*.down_proj", "--no-eval", "--model", "base",
         "--output", f"{o}/01-prune", "--json", f"{o}/01-prune.json"],
        ["finetune", "--seq-len", "64", "--n-calib", "4", "--eval-windows", "3", "--seed", "3", "--targets",
         "q_proj,v_proj", "--steps", "5", "--model", f"{o}/01-prune", "--output", f"{o}/02-finetune",
         "--json", f"{o}/02-finetune.json"],
        ["eval", "--seq-len", "64", "--eval-windows", "3", "--model", f"{o}/02-finetune", "--json", f"{o}/03-eval.json"],
        ["export", f"{o}/02-finetune", f"{o}/04-export", "--format", "sparse-bitmask"],
        ["info", f"{o}/04-export", "--layers", "--json", f"{o}/05-info.json"],
    ]
    assert stages[0].args.pattern == "2:4" and stages[0].args.skip == ["model.layers.0.*", "*.down_proj"]


def test_overrides_and_their_errors(tmp_path):
    recipe = write(tmp_path / "r.yaml", "stages: [{prune: {sparsity: 0.5}}, eval, eval]\n")
    stages = plan(load_recipe(recipe, ["eval.seq_len=16", "3.eval-windows=1", "1.sparsity=", "output=x"]), tmp_path)
    assert stages[1].argv[1:4] == ["--seq-len", "16", "--model"]
    assert stages[2].argv[1:6] == ["--seq-len", "16", "--eval-windows", "1", "--model"]
    assert "--sparsity" not in stages[0].argv  # an empty value: the command's default
    for override, fragment in [("finetune.steps=2", "no finetune stage"), ("4.seq_len=2", "no stage 4"),
                               ("steps", "not KEY=VALUE"), ("lr=1", "not a top-level setting")]:
        with pytest.raises(RecipeError, match=fragment):
            load_recipe(recipe, [override])


def test_key_numbers_of_each_stage_kind():
    assert key_numbers("prune", {"metrics": {"sparsity": 0.5, "dense": {"perplexity": 14.1}, "pruned": {"perplexity": 58.27}}}) \
        == "sparsity 0.5000; perplexity 14.10 → 58.27"
    assert key_numbers("finetune", {"metrics": {"pruned": {"perplexity": 58.27}, "finetuned": {"perplexity": 35.349},
                                                "pattern_identical": True}}) == "perplexity 58.27 → 35.35; zero pattern kept"
    assert key_numbers("train", {"metrics": {"before": {"accuracy": 0.1}, "after": {"accuracy": 0.54131},
                                             "parameters": {"before": {"parameters": 2000}, "after": {"parameters": 1200}}}}) \
        == "accuracy 0.1000 → accuracy 0.5413; parameters 2,000 → 1,200"
    assert key_numbers("eval", {"perplexity": 24.333}) == "perplexity 24.33"
    assert key_numbers("eval", {"perplexity": 20.0, "tasks": {"arc_easy": {"acc": 0.41}}}) == "perplexity 20.00; arc_easy acc 0.4100"
    assert key_numbers("eval", {"tasks": {"sparseforge_wiki": {"acc": 0.45, "acc_stderr": 0.08, "acc_norm": 0.675}}}) \
        == "sparseforge_wiki acc_norm 0.6750"
    assert key_numbers("bench-speed", {"models": [{"label": "d", "prefill_tokens_per_s": 100.4, "speedup_prefill": 1.0},
                                                  {"label": "s", "prefill_tokens_per_s": 202, "speedup_prefill": 2.012}]}) \
        == "d: prefill 100 tok/s (x1.00); s: prefill 202 tok/s (x2.01)"
    assert key_numbers("eval", None) == "-"


def test_an_interrupted_stage_says_where_to_resume(capsys, tmp_path, tiny_dir, monkeypatch):
    def interrupted(args):
        if getattr(args, "check_only", False):
            return 0
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "eval", interrupted)
    out = tmp_path / "out"
    code, _, err = run(capsys, "run", write(tmp_path / "r.yaml", TWO_STAGES), "--output", out, "--set", f"model={tiny_dir}")
    assert code == 130
    assert err.rstrip().splitlines()[-1].startswith("sparseforge: stage 2 (eval) interrupted; the finished stages' outputs")
    assert err.rstrip().endswith("--from-stage 2")
    report = json.loads((out / "report.json").read_text())
    assert [s["status"] for s in report["stages"]] == ["done", "interrupted"] and (out / "01-prune").is_dir()
