"""Evaluation: perplexity, sparsity inspection."""

from .perplexity import perplexity

__all__ = ["perplexity"]
