"""Labelled texts for sequence classification: sources, deterministic splits, label sets and rows.

Sources: ``wiki-topics`` (the embedded Wikipedia leads labelled with their topic,
"Uncategorized" dropped, split exactly as data.py's ``wiki``: articles sorted by
title, every 10th held out), a JSONL file (one object per line), a CSV or TSV file
(header row), or a ``datasets`` dataset saved with ``save_to_disk`` (split "train";
evaluation reads "validation" or else "test"). Labels are always strings.

Without a separate evaluation source, a file's held-out split is every 10th record
in file order (index % 10 == 9), so the split is a pure function of the file.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import DOCS_PER_CALL, SPLITS, dataset_split, jsonl_records, wiki_records
from ..errors import ConfigError, DataError, ModelError
from .data import TrainExamples

log = logging.getLogger(__name__)

WIKI_TOPICS = "wiki-topics"
#: the topic of Wikipedia articles without one: not a class
UNCATEGORIZED = "Uncategorized"
#: one record in this many is held out for evaluation when no evaluation source is given
HOLD_OUT_EVERY = 10
#: CSV cells may hold whole articles (the csv module's default limit is 128 KiB)
CSV_FIELD_LIMIT = 2**31 - 1


@dataclass
class LabelledTexts:
    """Texts with one string label each, and where they came from (for reports)."""

    texts: list[str]
    labels: list[str]
    source: str

    def __post_init__(self):
        if len(self.texts) != len(self.labels):
            raise ConfigError(f"{self.source}: {len(self.texts)} texts but {len(self.labels)} labels; give one label per text")

    def __len__(self) -> int:
        return len(self.texts)

    def class_counts(self) -> dict[str, int]:
        """Examples per label, labels sorted."""
        counts: dict[str, int] = {}
        for label in self.labels:
            counts[label] = counts.get(label, 0) + 1
        return dict(sorted(counts.items()))


@dataclass
class LabelSet:
    """The class names in index order: class ``i`` of the model is ``names[i]``.

    Build one from training labels with :meth:`from_labels` (sorted unique names);
    the constructor keeps the order it is given (e.g. a fine-tuned model's id2label).
    """

    names: list[str]
    _ids: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        self.names = [str(n) for n in self.names]
        self._ids = {name: i for i, name in enumerate(self.names)}
        if len(self._ids) != len(self.names):
            raise ConfigError(f"label names {self.names} repeat a name: give each class once")

    @classmethod
    def from_labels(cls, labels) -> LabelSet:
        """The sorted unique labels."""
        return cls(sorted({str(label) for label in labels}))

    @classmethod
    def from_dict(cls, data: dict) -> LabelSet:
        """Inverse of :meth:`to_dict`."""
        return cls(list(data["names"]))

    def index(self, label: str) -> int:
        try:
            return self._ids[label]
        except KeyError:
            raise DataError(f"label '{label}' is not one of the {len(self)} training labels: train on data that has it") from None

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, label) -> bool:
        return label in self._ids

    def to_dict(self) -> dict:
        return {"names": list(self.names)}

    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    def label2id(self) -> dict[str, int]:
        return dict(self._ids)


def _quoted(labels, limit: int = 3) -> str:
    """'a', 'b', 'c' (and 2 more)"""
    labels = list(labels)
    text = ", ".join(f"'{label}'" for label in labels[:limit])
    return text + (f" (and {len(labels) - limit} more)" if len(labels) > limit else "")


def _label_text(value, where: str, label_field: str) -> str:
    if value is None or isinstance(value, (list, dict)) or not str(value).strip():
        raise DataError(f"{where} has no usable '{label_field}' value ({value!r}): give every record a string or number label")
    return str(value).strip()


def _text(value) -> str:
    return "" if value is None else str(value)


def _jsonl_rows(path: Path, text_field: str, label_field: str) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    for number, record in jsonl_records(path):
        where = f"{path}:{number}"
        if not isinstance(record, dict) or text_field not in record:
            raise DataError(f"{where} has no '{text_field}' field: pass --text-field NAME")
        if label_field not in record:
            raise DataError(f"{where} has no '{label_field}' field: pass --label-field NAME")
        texts.append(_text(record[text_field]))
        labels.append(_label_text(record[label_field], where, label_field))
    return texts, labels


def _csv_rows(path: Path, text_field: str, label_field: str) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    delimiter = "\t" if path.suffix == ".tsv" else ","
    previous_limit = csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig: spreadsheets write a byte-order mark
            reader = csv.DictReader(f, delimiter=delimiter)
            try:
                header = reader.fieldnames
                if not header:
                    raise DataError(f"{path} has no header row: put the column names ({text_field}, {label_field}) on line 1")
                for name, option in ((text_field, "--text-field"), (label_field, "--label-field")):
                    if name not in header:
                        raise DataError(f"{path} has no '{name}' column (its header: {', '.join(map(str, header))}): pass {option} NAME")
                for row in reader:
                    where = f"{path}:{reader.line_num}"
                    if not any((v or "").strip() for k, v in row.items() if k is not None):
                        continue  # a blank line
                    for name in (text_field, label_field):
                        if row.get(name) is None:
                            raise DataError(f"{where} has no '{name}' field (the row has fewer cells than the header): fix that line")
                    texts.append(row[text_field])
                    labels.append(_label_text(row[label_field], where, label_field))
            except csv.Error as e:
                raise DataError(f"{path}:{reader.line_num} is not valid CSV ({e}): fix or remove that line") from None
    finally:
        csv.field_size_limit(previous_limit)
    return texts, labels


def _load_dataset(path: Path):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path} is a saved dataset; reading it needs `pip install datasets`") from None
    try:
        return datasets, datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(f"{path} is a directory but not a saved dataset: give a directory written by save_to_disk, "
                        "a .jsonl or a .csv file") from None


def _has_eval_split(path: Path) -> bool:
    """A saved DatasetDict with a validation or test split."""
    datasets, loaded = _load_dataset(path)
    return isinstance(loaded, datasets.DatasetDict) and any(s in loaded for s in ("validation", "test"))


def _dataset_rows(path: Path, split: str, text_field: str, label_field: str) -> tuple[list[str], list[str], str]:
    datasets, loaded = _load_dataset(path)
    loaded, name = dataset_split(loaded, path, split)
    where = f"dataset {path}" + (f" ({name} split)" if name else "")
    for column, option in ((text_field, "--text-field"), (label_field, "--label-field")):
        if column not in loaded.column_names:
            raise DataError(f"{where} has no '{column}' column (it has {', '.join(loaded.column_names)}): pass {option} NAME")
    feature = loaded.features[label_field]
    names = getattr(feature, "names", None) if isinstance(feature, datasets.ClassLabel) else None
    labels = []
    for row, value in enumerate(loaded[label_field]):
        if names is not None and value is not None:
            if value < 0:  # datasets' mark of an unlabelled row (e.g. GLUE's test splits)
                raise DataError(f"{where} row {row} is unlabelled (label {value}): evaluate on a labelled split, e.g. --eval-data FILE")
            value = names[value]
        labels.append(_label_text(value, f"{where} row {row}", label_field))
    return [_text(t) for t in loaded[text_field]], labels, where


def _wiki_topics(split: str) -> LabelledTexts:
    records = [r for r in wiki_records(split) if r["topic"] != UNCATEGORIZED]
    what = "eval split: every 10th article by title" if split == "eval" else "train split"
    return LabelledTexts([r["text"] for r in records], [r["topic"] for r in records], f"{WIKI_TOPICS} ({what})")


def read_labelled(source: str, text_field: str = "text", label_field: str = "label", split: str = "train") -> LabelledTexts:
    """The labelled texts of a source; a file is read whole, a saved dataset by split, wiki-topics by split.

    Texts that are empty or whitespace are dropped.
    """
    if split not in SPLITS:
        raise ConfigError(f"split '{split}' unknown: choose from {', '.join(SPLITS)}")
    if source == WIKI_TOPICS:
        return _wiki_topics(split)
    path = Path(source)
    if not path.exists():
        raise DataError(f"data {source} not found: give '{WIKI_TOPICS}', a .jsonl or .csv file, or a saved dataset directory")
    description = str(path)
    if path.is_dir():
        texts, labels, description = _dataset_rows(path, split, text_field, label_field)
    elif path.suffix == ".jsonl":
        texts, labels = _jsonl_rows(path, text_field, label_field)
    elif path.suffix in (".csv", ".tsv"):
        texts, labels = _csv_rows(path, text_field, label_field)
    else:
        raise DataError(f"data {source} is neither .jsonl nor .csv: convert it to JSONL with '{text_field}' and '{label_field}' fields")
    kept = [(t, label) for t, label in zip(texts, labels) if t.strip()]
    if len(kept) < len(texts):
        log.info("%s: %d records with empty text dropped", description, len(texts) - len(kept))
    if not kept:
        raise DataError(f"data {description} holds no labelled text: give a source with non-empty '{text_field}' values")
    return LabelledTexts([t for t, _ in kept], [label for _, label in kept], description)


def hold_out(whole: LabelledTexts) -> tuple[LabelledTexts, LabelledTexts]:
    """(train, eval): every 10th record (index % 10 == 9) held out for evaluation, the rest for training."""
    def part(held_out: bool) -> tuple[list[str], list[str]]:
        rows = [i for i in range(len(whole)) if (i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1) == held_out]
        return [whole.texts[i] for i in rows], [whole.labels[i] for i in rows]

    return (LabelledTexts(*part(False), f"{whole.source} without every 10th record"),
            LabelledTexts(*part(True), f"every 10th record of {whole.source} held out"))


def classification_splits(source: str, eval_source: str | None = None, text_field: str = "text",
                          label_field: str = "label") -> tuple[LabelledTexts, LabelledTexts, LabelSet, dict]:
    """(train, eval, label set, info for the report) of a classification source.

    wiki-topics and a saved dataset with a validation or test split bring their own
    evaluation split; any other source without ``eval_source`` holds out every 10th record.
    """
    if eval_source is not None:
        train = read_labelled(source, text_field, label_field, "train")
        evaluation = read_labelled(eval_source, text_field, label_field, "eval")
        if Path(source).is_file() and Path(source).resolve() == Path(eval_source).resolve():
            log.warning("--eval-data %s is the training data itself: its scores measure memorisation", eval_source)
    elif source == WIKI_TOPICS or (Path(source).is_dir() and _has_eval_split(Path(source))):
        train = read_labelled(source, text_field, label_field, "train")
        evaluation = read_labelled(source, text_field, label_field, "eval")
    else:
        whole = read_labelled(source, text_field, label_field, "train")
        train, evaluation = hold_out(whole)
        if not evaluation.texts:
            raise DataError(f"data {whole.source} has {len(whole)} records, too few to hold out every 10th for evaluation: "
                            "give at least 10 or pass --eval-data FILE")
    labels = LabelSet.from_labels(train.labels)
    if len(labels) < 2:
        raise DataError(f"{train.source} has one class only ('{labels.names[0]}'): classification needs at least two labels")
    unseen = sorted(set(evaluation.labels) - set(labels.names))
    if unseen:
        raise DataError(f"{evaluation.source} has labels never seen in training: {_quoted(unseen)}; "
                        "train on data with every label or drop those records")
    info = {"train": train.source, "eval": evaluation.source, "classes": len(labels), "train_examples": len(train),
            "eval_examples": len(evaluation), "class_counts": train.class_counts()}
    return train, evaluation, labels, info


class ClassificationExamples(TrainExamples):
    """Rows of ``input_ids`` and ``attention_mask`` (n x seq_len, right-padded) with one class index each (``labels``, n)."""

    #: an encoder's forward takes no use_cache
    model_kwargs: dict = {}
    loss_unit: str = "ex"

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
                 label_set: LabelSet | None = None, pad_token_id: int | None = None):
        super().__init__(input_ids, labels, attention_mask, "classification")
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape or labels.shape != (input_ids.shape[0],):
            raise ConfigError(f"classification rows need input_ids and attention_mask (n x seq_len) and labels (n,); got "
                              f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)} and {tuple(labels.shape)}")
        #: class names in index order, and the id padding the rows (a decoder's config needs it as pad_token_id)
        self.label_set, self.pad_token_id = label_set, pad_token_id

    @staticmethod
    def loss_units(batch: dict[str, torch.Tensor]) -> int:
        """Loss terms in a batch: one per row."""
        return int(batch["labels"].shape[0])


def classification_examples(tokenizer, texts: LabelledTexts, labels: LabelSet, seq_len: int) -> ClassificationExamples:
    """Rows of the first ``seq_len`` tokens of each text (with the tokenizer's special tokens), right-padded.

    A tokenizer without a pad token (LLaMA's) pads with its end-of-sequence token.
    """
    if seq_len < 2:
        raise ConfigError(f"seq_len {seq_len} is too small: use at least 2 (e.g. 128)")
    if not texts.texts:
        raise DataError(f"data {texts.source} holds no labelled text: give a non-empty source")
    unknown = sorted({label for label in texts.labels if label not in labels})
    if unknown:
        raise DataError(f"{texts.source} has labels outside the {len(labels)} training labels: {_quoted(unknown)}; "
                        "train on data with every label or drop those records")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ModelError("the tokenizer has neither a pad nor an end-of-sequence token: add one with "
                         "tokenizer.add_special_tokens({'pad_token': ...})")
    ids = torch.full((len(texts), seq_len), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    full = 0
    for start in range(0, len(texts), DOCS_PER_CALL):  # a few hundred texts per call keeps the tokenizer's memory small
        chunk = tokenizer(texts.texts[start : start + DOCS_PER_CALL], truncation=True, max_length=seq_len,
                          return_attention_mask=False, verbose=False)["input_ids"]
        for row, tokens in enumerate(chunk, start):
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
            full += len(tokens) == seq_len
    if full:
        log.info("%s: %d of %d texts fill --seq-len %d tokens (longer ones are truncated)", texts.source, full, len(texts), seq_len)
    targets = torch.tensor([labels.index(label) for label in texts.labels], dtype=torch.long)
    return ClassificationExamples(ids, targets, mask, label_set=labels, pad_token_id=int(pad))
