"""The cubic schedule of the kept fraction during gradual pruning (LoSparse / PLATON, METHODS.md section 5).

``p_t = 1`` up to ``t_i``; ``p_T + (1 − p_T)(1 − (t − t_i)/(T − t_i − t_f))³`` in the cubic phase;
``p_T`` for the last ``t_f`` steps. The paper prints ``(t − t_i − t_f)`` in the numerator, a typo: it
would not start at 1; the reference code's ``(t − t_i)`` is used. Masks are applied every ``ΔT``
steps of the cubic phase and at every step of the final phase.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class CubicSchedule:
    """Kept fraction of a sparsified quantity over training (LoSparse / PLATON cubic schedule).

    Steps count optimizer steps done so far (1..T)."""

    total_steps: int  # T
    final: float  # p_T, kept fraction at the end, in (0, 1]
    initial_steps: int  # t_i: kept fraction 1 up to here
    final_steps: int  # t_f: the last t_f steps are at p_T
    interval: int  # ΔT: masks are applied every ΔT steps during the cubic phase

    def __post_init__(self):
        for name in ("total_steps", "initial_steps", "final_steps", "interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ConfigError(f"{name} {value!r} must be a whole number of optimizer steps: give a step count, not a fraction")
        T, t_i, t_f = self.total_steps, self.initial_steps, self.final_steps
        if T < 1:
            raise ConfigError(f"total_steps {T} must be >= 1: train for at least one step")
        if not 0 < self.final <= 1:
            raise ConfigError(f"final kept fraction {self.final} must be in (0, 1]: e.g. 0.15 keeps 15% of the rows")
        if t_i < 0 or t_f < 0:
            raise ConfigError(f"initial_steps {t_i} and final_steps {t_f} must be >= 0: give step counts, not fractions")
        if self.interval < 1:
            raise ConfigError(f"mask interval {self.interval} must be >= 1: mask every ΔT >= 1 steps")
        if T - t_i - t_f < 1:
            raise ConfigError(
                f"initial_steps {t_i} + final_steps {t_f} leave no cubic phase in {T} steps: "
                "lower them so that total_steps - initial_steps - final_steps >= 1"
            )

    @classmethod
    def for_steps(cls, total_steps: int, final: float, initial_steps: int | None = None, final_steps: int | None = None,
                  interval: int | None = None) -> CubicSchedule:
        """A schedule whose unset parts scale with ``total_steps``, so a short run still reaches its budget:
        t_i = round(0.1 T), t_f = round(0.3 T), ΔT = max(1, min(10, T // 50))."""
        T = total_steps
        return cls(
            total_steps=T,
            final=final,
            initial_steps=round(0.1 * T) if initial_steps is None else initial_steps,
            final_steps=round(0.3 * T) if final_steps is None else final_steps,
            interval=max(1, min(10, T // 50)) if interval is None else interval,
        )

    @property
    def _final_start(self) -> int:
        return self.total_steps - self.final_steps

    def phase(self, step: int) -> str:
        """"dense" up to t_i, "cubic" strictly between t_i and T − t_f, "final" from T − t_f on."""
        if step <= self.initial_steps:
            return "dense"
        return "cubic" if step < self._final_start else "final"

    def kept_fraction(self, step: int) -> float:
        phase = self.phase(step)
        if phase == "dense":
            return 1.0
        if phase == "final":
            return self.final
        progress = (step - self.initial_steps) / (self.total_steps - self.initial_steps - self.final_steps)
        return self.final + (1.0 - self.final) * (1.0 - progress) ** 3

    def is_masking_step(self, step: int) -> bool:
        """Every ΔT steps (counted from t_i) in the cubic phase, every step of the final phase, never before."""
        phase = self.phase(step)
        if phase == "dense":
            return False
        return phase == "final" or (step - self.initial_steps) % self.interval == 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
