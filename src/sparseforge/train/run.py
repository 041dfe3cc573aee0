"""One training run, shared by every method that trains.

Recovery fine-tuning, LoSparse and TranSpa differ in what they do to the model
before training (inject adapters, reparametrise linears), during it (callbacks)
and after it (merge, compact); everything else is this module: the task's data
and its evaluation, the evaluation before and after, the trainer, timings,
memory and the report.

    run_data = lm_data(tokenizer, data="wiki", seq_len=512)
    model, report = run_training(model, run_data, TrainConfig(steps=100), prepare=..., finish=..., callbacks=[...])
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Callable

from ..data import fingerprint, load_windows
from ..eval.perplexity import perplexity
from ..measure import peak_rss_mb
from .data import TrainExamples, training_examples
from .trainer import Callback, TrainConfig, Trainer, model_fingerprint

log = logging.getLogger(__name__)


@dataclass
class RunData:
    """What a run trains on and how it is evaluated (``evaluate(model, progress) -> metrics``)."""

    task: str
    examples: TrainExamples
    evaluate: Callable[..., dict] | None
    info: dict
    #: the metric a method is judged by, and whether lower is better
    primary: str = "perplexity"
    lower_is_better: bool = True


def lm_data(tokenizer, *, data: str = "wiki", eval_data: str = "wiki", seq_len: int = 512, text_field: str = "text",
            eval_windows: int | None = 40, eval_batch_size: int = 1, evaluate: bool = True) -> RunData:
    """Language modelling: packed windows (or Alpaca instructions) of ``data``; perplexity on ``eval_data``'s held-out split."""
    examples = training_examples(tokenizer, data, seq_len, text_field)
    windows = load_windows(tokenizer, eval_data, "eval", seq_len, n=eval_windows, text_field=text_field) if evaluate else None
    log.info("training data: %d %s rows of %d tokens from %s", len(examples), examples.kind, seq_len, data)

    def evaluate_fn(model, progress: bool = True) -> dict:
        return perplexity(model, windows, batch_size=eval_batch_size, progress=progress)

    info = {"task": "lm", "source": data, "kind": examples.kind, "rows": len(examples), "seq_len": seq_len,
            "train_fingerprint": fingerprint(examples.input_ids),
            "eval": None if windows is None else {"source": eval_data, "windows": int(windows.shape[0]),
                                                  "fingerprint": fingerprint(windows)}}
    return RunData("lm", examples, evaluate_fn if windows is not None else None, info)


def classification_data(tokenizer, splits, *, seq_len: int = 128, eval_batch_size: int = 32, evaluate: bool = True) -> RunData:
    """Sequence classification: ``splits`` from ``train.labelled.classification_splits``; accuracy and macro-F1."""
    from ..eval.classification import classification_metrics
    from .labelled import classification_examples

    train, held_out, labels, split_info = splits
    examples = classification_examples(tokenizer, train, labels, seq_len)
    eval_examples = classification_examples(tokenizer, held_out, labels, seq_len) if evaluate else None
    log.info("training data: %d examples of %d classes, first %d tokens", len(examples), len(labels), seq_len)

    def evaluate_fn(model, progress: bool = True) -> dict:
        return classification_metrics(model, eval_examples, batch_size=eval_batch_size, progress=progress)

    info = {"task": "classify", **split_info, "labels": labels.names, "seq_len": seq_len,
            "train_fingerprint": fingerprint(examples.input_ids),
            "eval_fingerprint": None if eval_examples is None else fingerprint(eval_examples.input_ids)}
    return RunData("classify", examples, evaluate_fn if eval_examples is not None else None, info,
                   primary="accuracy", lower_is_better=False)


@dataclass
class RunReport:
    """What every training run reports; methods add their own section beside it."""

    data: dict
    train_config: dict
    trainable: dict
    metrics_before: dict | None
    metrics_after: dict | None
    history: list[dict] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    median_step_seconds: float = 0.0
    peak_rss_mb: float = 0.0  # the whole process's so far: loading, data, training, finishing
    training_peak_rss_mb: dict = field(default_factory=dict)  # before and after the training loop
    resumed_from: int = 0
    method: dict = field(default_factory=dict)  # what prepare/finish reported

    def to_dict(self) -> dict:
        return asdict(self)


def run_training(model, run_data: RunData, config: TrainConfig, *, prepare: Callable | None = None,
                 finish: Callable | None = None, callbacks: list[Callback] | Callable[[], list[Callback]] = (),
                 identity: dict | None = None,
                 resume=None, progress: bool = True, evaluate_before: bool = True):
    """Evaluate, ``prepare(model)``, train, ``finish(model)``, evaluate. Returns ``(model, RunReport)``.

    ``prepare(model) -> dict | None`` changes the model before training (its dict goes to
    ``report.method``); ``finish(model) -> (model, dict | None)`` after it (it may return a
    new model, e.g. a compact one). The trainer evaluates every ``config.eval_every`` steps;
    the run itself evaluates before ``prepare`` and after ``finish``. ``callbacks`` may be a
    function returning them, called after ``prepare`` (a method's callbacks often need the
    prepared model). ``evaluate_before=False`` skips the first evaluation (e.g. a new,
    untrained classification head scores chance).

    A checkpoint is resumed only by a run with the same settings that starts from the same model:
    the identity holds a fingerprint of the weights before ``prepare`` changes them.
    """
    starting_model = model_fingerprint(model)
    evaluate = run_data.evaluate
    before = evaluate(model, progress=progress) if evaluate and evaluate_before else None
    method_info = dict((prepare(model) if prepare else None) or {})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if callable(callbacks):
        callbacks = callbacks()
    trainer = Trainer(model, run_data.examples, config,
                      evaluate=(lambda m: evaluate(m, progress=False)) if evaluate else None,
                      callbacks=callbacks, progress=progress,
                      identity={"train_fingerprint": run_data.info["train_fingerprint"], "model": starting_model,
                                **(identity or {})})
    result = trainer.train(resume=resume)
    model = trainer.unwrapped_model()
    if finish:
        model, finished = finish(model)
        method_info.update(finished or {})
    after = evaluate(model, progress=progress) if evaluate else None
    if before and after:
        log.info("%s %.4g -> %.4g", run_data.primary, before[run_data.primary], after[run_data.primary])
    report = RunReport(
        data=run_data.info, train_config=asdict(config), trainable={"trainable": trainable, "model": total},
        metrics_before=before, metrics_after=after, history=result.history, evaluations=result.evaluations,
        train_seconds=round(result.seconds, 3), median_step_seconds=round(result.median_step_seconds(), 4),
        peak_rss_mb=round(peak_rss_mb(), 1),
        training_peak_rss_mb={"before": result.peak_rss_before_mb, "after": result.peak_rss_mb},
        resumed_from=result.resumed_from, method=method_info,
    )
    return model, report
