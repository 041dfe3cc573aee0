"""Sequence-classification quality: accuracy and macro F1 over held-out labelled rows."""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, NumericalError


def _check(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> None:
    if predictions.shape != targets.shape or predictions.dim() != 1:
        raise ConfigError(f"predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} must be equal-length vectors")
    for name, values in (("predictions", predictions), ("targets", targets)):
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= num_classes):
            raise ConfigError(f"{name} hold class indices outside 0..{num_classes - 1}: the model's classes and the data's labels differ")


def per_class_f1(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict[int, float]:
    """F1 = 2PR / (P + R) (0 when P + R = 0) of every class that occurs in targets or predictions."""
    _check(predictions, targets, num_classes)
    predictions, targets = predictions.long().cpu(), targets.long().cpu()
    true_positive = torch.bincount(targets[predictions == targets], minlength=num_classes)
    predicted = torch.bincount(predictions, minlength=num_classes)
    actual = torch.bincount(targets, minlength=num_classes)
    scores = {}
    for c in range(num_classes):
        if predicted[c] == 0 and actual[c] == 0:
            continue
        tp = int(true_positive[c])
        precision = tp / int(predicted[c]) if predicted[c] else 0.0
        recall = tp / int(actual[c]) if actual[c] else 0.0
        scores[c] = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return scores


def macro_f1(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> float:
    """Mean F1 over the classes that occur in targets or predictions (scikit-learn's ``average="macro"``)."""
    scores = per_class_f1(predictions, targets, num_classes)
    return sum(scores.values()) / len(scores) if scores else 0.0


def _device(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    parameter = next(iter(model.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _class_names(model, examples, num_classes: int) -> list:
    """model.config.id2label when it names every class, else the examples' label set, else the indices."""
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    names = [id2label.get(i, id2label.get(str(i))) for i in range(num_classes)]
    if all(n is not None for n in names):
        return names
    label_set = getattr(examples, "label_set", None)
    if label_set is not None and len(label_set) == num_classes:
        return list(label_set.names)
    return list(range(num_classes))


def classification_metrics(model, examples, batch_size: int = 32, progress: bool = True) -> dict:
    """Accuracy and macro F1 of ``model`` on ClassificationExamples (argmax of the logits against ``labels``)."""
    start = time.perf_counter()
    was_training = model.training
    device = _device(model)
    predictions = []
    model.eval()
    try:
        with torch.no_grad():
            for rows in tqdm(torch.arange(len(examples)).split(batch_size), desc="classify", disable=not progress):
                batch = examples.batch(rows)
                logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
                if not torch.isfinite(logits).all():
                    raise NumericalError("classification logits are not finite: the model produced NaN or inf; evaluate in float32")
                predictions.append(logits.argmax(-1).cpu())
    finally:
        model.train(was_training)
    num_classes = int(logits.shape[-1])
    predicted, targets = torch.cat(predictions), examples.labels.cpu()
    if int(targets.max()) >= num_classes:
        raise ConfigError(f"the model has {num_classes} classes but the data has labels up to index {int(targets.max())}: "
                          "fine-tune a classifier with the data's label set")
    names = _class_names(model, examples, num_classes)
    scores = per_class_f1(predicted, targets, num_classes)
    return {
        "accuracy": float((predicted == targets).float().mean()),
        "macro_f1": sum(scores.values()) / len(scores),
        "n_examples": int(targets.numel()),
        "per_class_f1": {names[c]: f1 for c, f1 in scores.items()},
        "seconds": round(time.perf_counter() - start, 3),
    }
