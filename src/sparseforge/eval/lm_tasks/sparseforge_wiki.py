"""Loaded by lm-eval by file path (the YAML's ``!function``), so it imports sparseforge absolutely."""

from sparseforge.eval.wiki_task import lm_eval_dataset

__all__ = ["lm_eval_dataset"]
