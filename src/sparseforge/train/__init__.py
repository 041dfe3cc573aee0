"""The shared trainer (Accelerate underneath), its callbacks and its data."""

from .data import TrainExamples, training_examples, write_wiki_instructions
from .trainer import Callback, TrainConfig, Trainer, TrainResult

__all__ = ["Callback", "TrainConfig", "TrainExamples", "TrainResult", "Trainer", "training_examples",
           "write_wiki_instructions"]
