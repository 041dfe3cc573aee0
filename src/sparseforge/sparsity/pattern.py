"""Sparsity patterns: unstructured fraction or N:M (N of every M kept).

N:M follows NVIDIA's convention: in every row, within each group of M
consecutive input columns, exactly N weights are *kept*. "2:4" is 50% sparsity,
"2:8" is 75%. Some papers write the number *pruned* first (SparseLLM's "3:4"
means 75% sparsity); in this syntax that is "1:4".
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import PatternError

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Pattern:
    """A sparsity request. Exactly one of ``sparsity`` (unstructured) or ``n, m`` (N:M)."""

    sparsity: float = 0.0
    n: int | None = None
    m: int | None = None

    def __post_init__(self):
        if self.is_nm:
            if self.n < 1 or self.m < 2 or self.n >= self.m:
                raise PatternError(
                    f"impossible N:M pattern '{self.n}:{self.m}': need 1 <= N < M "
                    f"(N weights kept of every M; e.g. '2:4' = 50% sparsity, '1:4' = 75%)"
                )
        else:
            s = self.sparsity
            if not isinstance(s, (int, float)) or math.isnan(s) or not 0.0 <= s < 1.0:
                raise PatternError(
                    f"sparsity {s!r} is outside [0, 1): give the fraction of zeros, e.g. 0.5"
                )

    @property
    def is_nm(self) -> bool:
        return self.n is not None

    @property
    def target_sparsity(self) -> float:
        """Fraction of zeros this pattern asks for."""
        return 1.0 - self.n / self.m if self.is_nm else float(self.sparsity)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity:g}"

    @classmethod
    def parse(cls, text: str | float | Pattern) -> Pattern:
        """Parse ``"0.7"``, ``0.7`` or ``"2:4"``; raise PatternError with the fix otherwise."""
        if isinstance(text, Pattern):
            return text
        if isinstance(text, (int, float)):
            return cls(sparsity=float(text))
        s = str(text).strip()
        if ":" in s:
            match = _NM_RE.match(s)
            if not match:
                raise PatternError(
                    f"malformed N:M pattern '{s}': write N:M with whole numbers, e.g. '2:4'"
                )
            return cls(n=int(match.group(1)), m=int(match.group(2)))
        try:
            value = float(s)
        except ValueError:
            raise PatternError(
                f"malformed sparsity '{s}': give a fraction in [0, 1), e.g. 0.5, or N:M, e.g. 2:4"
            ) from None
        return cls(sparsity=value)

    def check_width(self, in_features: int, layer: str) -> None:
        """N:M needs M to divide the input width of the layer."""
        if self.is_nm and in_features % self.m:
            raise PatternError(
                f"pattern {self} does not fit layer {layer}: its input width {in_features} "
                f"is not a multiple of M={self.m}; pick an M that divides it or skip the layer"
            )
