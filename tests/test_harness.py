"""Zero-shot lm-eval tasks: the built-in sparseforge_wiki task's data, scores on tiny models, the CLI and its errors."""

from __future__ import annotations

import builtins
import json
import math

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from sparseforge.cli import main
from sparseforge.data import wiki_records
from sparseforge.errors import ConfigError
from sparseforge.eval import harness
from sparseforge.eval.wiki_task import CHOICES, TASK_NAME, build_examples, read_examples, sentences, task_file

pytest.importorskip("lm_eval")

#: examples of the chance-band test: 4 sigma of a binomial(N, 1/4) is +-0.17 around 0.25
BAND_EXAMPLES = 100


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    """The task's JSONL goes to a cache of this module's own, built once."""
    monkeypatch.setenv("SPARSEFORGE_CACHE", str(tmp_path_factory.getbasetemp() / "harness-cache"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return LlamaForCausalLM.from_pretrained(tiny_dir).eval(), AutoTokenizer.from_pretrained(tiny_dir)


def test_sentences_split_at_sentence_ends_only():
    text = "Dr. Smith went to St. Louis in 1904. J. R. R. Tolkien wrote (in 1937) a book! Was it 3.5 cm long? It was 4.2."
    assert sentences(text) == ["Dr. Smith went to St. Louis in 1904.", "J. R. R. Tolkien wrote (in 1937) a book!",
                               "Was it 3.5 cm long?", "It was 4.2."]


def test_examples_pick_the_true_second_sentence_among_other_articles():
    records = [{"title": f"T{i}", "text": f"Article {i} starts here. Its second sentence is number {i}. A third."}
               for i in range(8)]
    records.append({"title": "short", "text": "Only one sentence in this article."})
    records.append({"title": "tiny", "text": "Tiny. Too short to use."})
    examples = build_examples(records, seed=0)
    assert [e["title"] for e in examples] == [f"T{i}" for i in range(8)]
    for i, example in enumerate(examples):
        assert example["context"] == f"Article {i} starts here."
        endings = example["endings"]
        assert len(endings) == CHOICES == len(set(endings))
        assert endings[example["label"]] == f"Its second sentence is number {i}."
        assert all(e.startswith("Its second sentence is number ") for e in endings)  # distractors: other articles' 2nd
    assert build_examples(records, seed=0) == examples
    assert [e["label"] for e in build_examples(records, seed=1)] != [e["label"] for e in examples]


def test_task_file_is_deterministic_and_from_the_held_out_split(tmp_path, monkeypatch):
    first = task_file()
    monkeypatch.setenv("SPARSEFORGE_CACHE", str(tmp_path))
    second = task_file()
    assert second != first and second.read_bytes() == first.read_bytes()
    mtime = second.stat().st_mtime_ns
    assert task_file().stat().st_mtime_ns == mtime  # cached, not rebuilt
    examples = read_examples(second)
    held_out = {r["title"]: r["text"] for r in wiki_records("eval")}
    train_titles = {r["title"] for r in wiki_records("train")}
    assert len(examples) > 800
    assert all(e["title"] in held_out and e["title"] not in train_titles for e in examples)
    for e in examples[::97]:
        assert held_out[e["title"]].startswith(f"{e['context']} {e['endings'][e['label']]}")
    counts = [sum(e["label"] == k for e in examples) for k in range(CHOICES)]
    n = len(examples)
    assert all(abs(c - n / CHOICES) < 4 * math.sqrt(n * (1 / CHOICES) * (1 - 1 / CHOICES)) for c in counts), counts


def _own_scores(model, tokenizer, examples) -> tuple[float, float]:
    """acc and acc_norm computed here, as lm-eval defines them: the ending with the highest summed log-probability
    after the context and a space (acc_norm: divided by the ending's length in characters)."""
    hits = hits_norm = 0
    for example in examples:
        context_ids = tokenizer(example["context"], add_special_tokens=False)["input_ids"]
        scores = []
        for ending in example["endings"]:
            ids = tokenizer(f"{example['context']} {ending}", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
            scores.append(sum(logprobs[t - 1, ids[t]].item() for t in range(len(context_ids), len(ids))))
        lengths = [len(ending) for ending in example["endings"]]
        hits += max(range(CHOICES), key=lambda k: scores[k]) == example["label"]
        hits_norm += max(range(CHOICES), key=lambda k: scores[k] / lengths[k]) == example["label"]
    return hits / len(examples), hits_norm / len(examples)


def test_scores_match_an_independent_computation_and_repeat(tiny, one_thread):
    model, tokenizer = tiny
    first = harness.run_tasks(model, tokenizer, [TASK_NAME], limit=12, batch_size=4)
    second = harness.run_tasks(model, tokenizer, [TASK_NAME], limit=12, batch_size=1)
    scores = first["tasks"][TASK_NAME]
    assert second["tasks"] == first["tasks"]
    assert scores["n"] == 12 and 0 <= scores["acc"] <= 1 and 0 <= scores["acc_norm"] <= 1
    p = scores["acc"]
    assert scores["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (12 - 1)))  # lm-eval's sample stderr of a mean
    acc, acc_norm = _own_scores(model, tokenizer, read_examples(task_file())[:12])
    assert (scores["acc"], scores["acc_norm"]) == pytest.approx((acc, acc_norm))


def test_a_compact_losparse_model_loaded_by_sparseforge(tiny_dir, tmp_path, one_thread):
    from sparseforge import load_model, save
    from sparseforge.lowrank import CompactLoSparseLinear
    from sparseforge.training import train

    text = tmp_path / "wiki.txt"
    text.write_text("\n\n".join(r["text"] for r in wiki_records("train")[:10]))
    model, tokenizer = load_model(tiny_dir)
    train(model, tokenizer, method="losparse", task="lm", data=str(text), seq_len=32, steps=4, batch_size=2, lr=1e-3,
          evaluate=False, progress=False, method_options={"keep": 0.4, "initial_steps": 1, "final_steps": 1, "interval": 2})
    save(model, tokenizer, tmp_path / "compact", metadata={})  # the manifest comes from the model
    compact, tokenizer = load_model(tmp_path / "compact")
    assert any(isinstance(m, CompactLoSparseLinear) for m in compact.modules())
    scores = harness.run_tasks(compact, tokenizer, [TASK_NAME], limit=6)["tasks"][TASK_NAME]
    acc, acc_norm = _own_scores(compact, tokenizer, read_examples(task_file())[:6])
    assert (scores["acc"], scores["acc_norm"]) == pytest.approx((acc, acc_norm))


def test_random_weights_score_near_chance(tiny, one_thread):
    model, tokenizer = tiny
    scores = harness.run_tasks(model, tokenizer, [TASK_NAME], limit=BAND_EXAMPLES, batch_size=8)["tasks"][TASK_NAME]
    chance = 1 / CHOICES
    band = 4 * math.sqrt(chance * (1 - chance) / BAND_EXAMPLES)
    assert scores["n"] == BAND_EXAMPLES
    assert abs(scores["acc"] - chance) < band and abs(scores["acc_norm"] - chance) < band, scores


def test_cli_writes_the_table_and_the_json(capsys, tiny_dir, tmp_path, one_thread):
    out = tmp_path / "scores.json"
    code = main(["eval", "--model", str(tiny_dir), "--tasks", f"{TASK_NAME},perplexity", "--limit", "4",
                 "--batch-size", "4", "--seq-len", "32", "--eval-windows", "2", "--json", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0
    result = json.loads(out.read_text())
    scores = result["tasks"][TASK_NAME]
    assert scores["n"] == 4 and scores["acc"] in (0, 0.25, 0.5, 0.75, 1)
    assert result["lm_eval"]["limit"] == 4 and math.isfinite(result["perplexity"])
    table = [line.split() for line in stdout.splitlines() if line.startswith(TASK_NAME)]
    assert [row[1] for row in table] == ["acc", "acc_norm"]
    assert float(table[0][2]) == pytest.approx(scores["acc"], abs=1e-4)
    assert stdout.startswith("perplexity ")


def run_error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("sparseforge: error:")]
    assert code == 2 and len(lines) == 1, err
    return lines[0]


def test_lm_eval_not_installed(capsys, monkeypatch):
    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    line = run_error(capsys, ["eval", "--model", "/nonexistent/model", "--tasks", TASK_NAME])
    assert "pip install 'sparseforge[eval]'" in line


@pytest.fixture
def hub_task(tmp_path, monkeypatch):
    """Tasks indexed from sparseforge's folder and one with a hub dataset that is not cached (lm-eval's own ~15,000
    tasks take half a minute to index)."""
    from lm_eval.tasks import TaskManager

    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "uncached.yaml").write_text("task: uncached_hub_task\ndataset_path: sparseforge-tests/not-a-cached-dataset\n"
                                          "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{q}}'\n"
                                          "doc_to_target: 0\ndoc_to_choice: ['a', 'b']\n")
    monkeypatch.setattr(harness, "task_manager", lambda names: TaskManager(include_path=[str(harness.TASKS_DIR), str(folder)],
                                                                           include_defaults=False))
    return "uncached_hub_task"


def test_unknown_task_and_missing_dataset_are_refused_before_the_model_loads(capsys, hub_task, monkeypatch):
    # the model does not exist: both errors come before it is looked for
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    line = run_error(capsys, ["eval", "--model", "/nonexistent/model", "--tasks", f"{TASK_NAME},sparseforge_wik"])
    assert "unknown task 'sparseforge_wik' (did you mean sparseforge_wiki?)" in line
    line = run_error(capsys, ["eval", "--model", "/nonexistent/model", "--tasks", f"{TASK_NAME},{hub_task}"])
    assert (f"task {hub_task} needs its dataset (sparseforge-tests/not-a-cached-dataset), which is not in the local cache"
            in line and f"--tasks {TASK_NAME}" in line)
    import os

    assert "HF_DATASETS_OFFLINE" not in os.environ  # offline only during the run


def test_check_task_names_suggests_the_closest():
    harness.check_task_names(["hellaswag"], ["hellaswag", "arc_easy"])
    with pytest.raises(ConfigError, match=r"'helaswag' \(did you mean hellaswag\?\); 'zzz':"):
        harness.check_task_names(["helaswag", "arc_easy", "zzz"], ["hellaswag", "arc_easy", "arc_challenge"])
    with pytest.raises(ConfigError, match="names no task"):
        harness.parse_task_list(" , ")
    assert harness.parse_task_list("a, b,a") == ["a", "b"]


def test_limit_without_tasks_and_bad_limit(capsys):
    assert "--limit counts the examples of --tasks" in run_error(capsys, ["eval", "--model", "/nonexistent", "--limit", "5"])
    assert "must be at least 1" in run_error(capsys, ["eval", "--tasks", TASK_NAME, "--limit", "0"])


def test_tasks_on_an_encoder_say_tasks_need_a_language_model(capsys, tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    line = run_error(capsys, ["eval", "--model", str(tmp_path / "bert"), "--tasks", TASK_NAME, "--limit", "2"])
    assert "encoder with no causal language-model head" in line and "--tasks scores causal language models" in line
    assert "load it with --task classify" not in line  # the loader's advice is for another command line
