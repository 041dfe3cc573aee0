"""Compression during training: the train-time methods of the method index on the shared run.

    splits = classification_splits("wiki-topics")
    model, tok = load_model("encoder", task="classify", label_names=splits[2].names)
    report = train(model, tok, method="losparse", task="classify", data=splits, steps=300, keep=0.15)
    save(model, tok, "out/minilm-losparse-15", metadata=report.to_dict())

The model is changed in place (a compact model after LoSparse); the report
says what remains of it, how long training took and how good it is.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import torch

from .data import check_seq_len
from .errors import ConfigError
from .eval.speed import parameter_bytes as model_size  # weights' parameters and bytes, tied tensors once
from .methods import TRAIN_TIME, build_train_method, default_lr, get_method_info
from .models import get_adapter
from .options import TASKS
from .train import TrainConfig
from .train.run import classification_data, lm_data, run_training

log = logging.getLogger(__name__)

#: default tokens per example: LM windows, and the start of each text for classification
DEFAULT_SEQ_LEN = {"lm": 512, "classify": 128}


class DenseTraining:
    """Plain fine-tuning of every weight: the quality ceiling the compressing methods are judged against."""

    def identity(self) -> dict:
        return {}

    def prepare(self, model) -> dict:
        for p in model.parameters():
            p.requires_grad_(True)
        return {}

    def callbacks(self) -> list:
        return []

    def finish(self, model):
        return model, {}


def build_dense(name: str, steps: int, options: dict) -> DenseTraining:
    if options:
        raise ConfigError(f"dense training takes no method options (got {', '.join(options)})")
    return DenseTraining()


@dataclass
class TrainReport:
    method: str
    task: str
    size_before: dict
    size_after: dict
    run: dict
    method_report: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def train(model, tokenizer, *, method: str = "losparse", task: str = "lm", data="wiki", eval_data: str | None = None,
          seq_len: int | None = None, text_field: str = "text", label_field: str = "label", eval_windows: int | None = 40,
          eval_batch_size: int | None = None, evaluate: bool = True, evaluate_before: bool = True, resume=None,
          progress: bool = True,
          method_options: dict | None = None, **train_options) -> TrainReport:
    """Train ``model`` in place with a train-time method; returns the report.

    ``data``: for ``task="lm"`` a text source (wiki, a file, a saved dataset); for
    ``task="classify"`` a labelled source (wiki-topics, JSONL/CSV, dataset dir) or the
    ``(train, eval, labels, info)`` tuple of ``classification_splits`` — the model must
    have been loaded with those labels. ``method_options`` are the method's own settings
    (LoSparse: keep, rank_ratio, ...); other keyword options are TrainConfig fields.
    """
    get_method_info(method, TRAIN_TIME)  # an unknown or wrong-kind name fails here
    if task not in TASKS:
        raise ConfigError(f"task '{task}' unknown: choose from {', '.join(TASKS)}")
    train_options.setdefault("lr", default_lr(method, task))
    config = TrainConfig(eval_first_last=False, **train_options)
    train_method = build_train_method(method, config.steps, method_options)
    seq_len = seq_len or DEFAULT_SEQ_LEN[task]
    check_seq_len(seq_len, get_adapter(model).context_length())
    if hasattr(train_method, "check"):  # settings that need the model's shapes, before data and evaluation
        train_method.check(model)
    torch.manual_seed(config.seed)  # dropout and any new layers draw from here
    if task == "lm":
        run_data = lm_data(tokenizer, data=data, eval_data=eval_data or "wiki", seq_len=seq_len, text_field=text_field,
                           eval_windows=eval_windows, eval_batch_size=eval_batch_size or 1, evaluate=evaluate)
    else:
        from .train.labelled import classification_splits

        splits = data if isinstance(data, tuple) else classification_splits(data, eval_data, text_field, label_field)
        check_label_head(model, splits[2].names)
        run_data = classification_data(tokenizer, splits, seq_len=seq_len, eval_batch_size=eval_batch_size or 32,
                                       evaluate=evaluate)
    size_before = model_size(model)
    model, run = run_training(model, run_data, config, prepare=train_method.prepare, finish=train_method.finish,
                              callbacks=train_method.callbacks, identity={"method": method, **train_method.identity()},
                              resume=resume, progress=progress, evaluate_before=evaluate_before)
    size_after = model_size(model)
    method_report = run.method
    run_dict = run.to_dict()
    run_dict.pop("method")
    return TrainReport(method=method, task=task, size_before=size_before, size_after=size_after, run=run_dict,
                       method_report=method_report)


def check_label_head(model, names: list[str]) -> None:
    """The classification head must predict exactly the training labels, in the same order."""
    config = model.config
    have = [config.id2label[i] for i in range(config.num_labels)] if getattr(config, "id2label", None) else []
    if getattr(config, "num_labels", None) != len(names) or (have and have != list(names) and not _generic(have)):
        raise ConfigError(f"the model's head predicts {config.num_labels} labels, the data has {len(names)} "
                          f"({', '.join(names[:3])}...): load the model with these label names")


def _generic(labels: list[str]) -> bool:
    return all(label == f"LABEL_{i}" for i, label in enumerate(labels))
