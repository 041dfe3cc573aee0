"""The command line's checks of plain settings, run before anything slow (no torch needed).

Each factory returns an argparse ``type=`` that turns the text into a number or refuses it
with a message naming the allowed range, so a bad number ends in one line before any
model, data or tokenizer is touched. Settings that need the model (widths, layer names)
are checked by ``preflight``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (no usage block) and exits 2."""

    def error(self, message: str):
        self.exit(2, f"sparseforge: error: {message} (see `{self.prog} --help`)\n")


def _number(text: str, kind: type, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not {what}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def integer(minimum: int) -> Callable[[str], int]:
    """An integer of at least ``minimum``."""

    def parse(text: str) -> int:
        value = _number(text, int, "a whole number")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def real(low: float | None = None, high: float | None = None, low_open: bool = False,
         high_open: bool = False, example: str | None = None) -> Callable[[str], float]:
    """A finite float in the interval given by ``low``/``high`` (open ends where asked)."""
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    interval = f"{left}{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}{right}"

    def parse(text: str) -> float:
        value = _number(text, float, "a number")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            hint = f", e.g. {example}" if example else ""
            raise argparse.ArgumentTypeError(f"{text} is outside {interval}{hint}")
        return value

    parse.__name__ = f"number in {interval}"
    return parse


def positive(example: str) -> Callable[[str], float]:
    """A finite float > 0."""
    return real(0.0, None, low_open=True, example=example)


def fraction(example: str, *, zero: bool = False, one: bool = False) -> Callable[[str], float]:
    """A fraction in (0, 1), with 0 and/or 1 allowed when asked."""
    return real(0.0, 1.0, low_open=not zero, high_open=not one, example=example)

