"""The cubic kept-fraction schedule: hand-computed values, phases, masking steps, defaults, validation."""

from __future__ import annotations

import pytest

from sparseforge.errors import ConfigError
from sparseforge.sparsity.schedule import CubicSchedule


def schedule(**overrides) -> CubicSchedule:
    settings = {"total_steps": 100, "final": 0.2, "initial_steps": 10, "final_steps": 30, "interval": 5}
    return CubicSchedule(**(settings | overrides))


def test_values_at_the_phase_boundaries_and_midway():
    s = schedule()  # cubic phase: steps 11..69 over a span of T - t_i - t_f = 60
    assert s.kept_fraction(0) == 1.0
    assert s.kept_fraction(10) == 1.0  # still dense at t_i
    assert s.kept_fraction(11) == pytest.approx(0.2 + 0.8 * (59 / 60) ** 3)  # the code's formula starts from ~1, not the typo's
    assert s.kept_fraction(40) == pytest.approx(0.3)  # halfway: 0.2 + 0.8 * 0.5**3
    assert s.kept_fraction(55) == pytest.approx(0.2 + 0.8 * 0.25**3)  # 0.2125
    assert s.kept_fraction(69) == pytest.approx(0.2 + 0.8 / 60**3)
    assert s.kept_fraction(70) == 0.2  # T - t_f
    assert s.kept_fraction(100) == 0.2
    assert s.kept_fraction(150) == 0.2


def test_phases():
    s = schedule()
    assert [s.phase(t) for t in (0, 10, 11, 69, 70, 100)] == ["dense", "dense", "cubic", "cubic", "final", "final"]


def test_monotone_non_increasing_and_continuous_at_the_end_of_the_cubic_phase():
    for s in (schedule(), schedule(initial_steps=0, final_steps=0), CubicSchedule.for_steps(37, 0.05)):
        values = [s.kept_fraction(t) for t in range(0, s.total_steps + 3)]
        assert all(a >= b for a, b in zip(values, values[1:]))
        assert values[0] == 1.0 and values[-1] == s.final
        end = s.total_steps - s.final_steps
        assert s.kept_fraction(end - 1) - s.kept_fraction(end) < 1e-3  # no jump into the final phase


def test_final_one_keeps_everything():
    s = schedule(final=1.0)
    assert all(s.kept_fraction(t) == 1.0 for t in range(0, 101))


def test_masking_steps_by_hand():
    s = CubicSchedule(total_steps=20, final=0.5, initial_steps=2, final_steps=6, interval=3)
    # cubic phase 3..13: (t - 2) % 3 == 0 at 5, 8, 11; final phase 14..20: every step
    assert [t for t in range(0, 23) if s.is_masking_step(t)] == [5, 8, 11, *range(14, 23)]


def test_masking_every_step_with_interval_one_and_no_dense_phase():
    s = CubicSchedule(total_steps=5, final=0.5, initial_steps=0, final_steps=0, interval=1)
    assert [t for t in range(0, 6) if s.is_masking_step(t)] == [1, 2, 3, 4, 5]
    assert s.kept_fraction(1) == pytest.approx(0.5 + 0.5 * 0.8**3)
    assert s.kept_fraction(5) == 0.5


def test_defaults_scale_with_the_run():
    s = CubicSchedule.for_steps(300, 0.15)
    assert (s.initial_steps, s.final_steps, s.interval) == (30, 90, 6)
    s = CubicSchedule.for_steps(10, 0.15)
    assert (s.initial_steps, s.final_steps, s.interval) == (1, 3, 1)
    assert s.kept_fraction(7) == 0.15  # a 10-step run reaches its budget
    s = CubicSchedule.for_steps(5000, 0.1)
    assert s.interval == 10  # capped
    s = CubicSchedule.for_steps(1, 0.5)
    assert (s.initial_steps, s.final_steps, s.interval) == (0, 0, 1) and s.kept_fraction(1) == 0.5


def test_explicit_values_override_the_defaults():
    s = CubicSchedule.for_steps(300, 0.15, initial_steps=0, final_steps=10, interval=1)
    assert (s.initial_steps, s.final_steps, s.interval) == (0, 10, 1)


def test_to_dict():
    assert schedule().to_dict() == {"total_steps": 100, "final": 0.2, "initial_steps": 10, "final_steps": 30, "interval": 5}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"total_steps": 0}, "total_steps 0 must be >= 1"),
        ({"final": 0.0}, r"final kept fraction 0.0 must be in \(0, 1\]"),
        ({"final": 1.2}, r"final kept fraction 1.2 must be in \(0, 1\]"),
        ({"final": float("nan")}, "final kept fraction nan"),
        ({"initial_steps": -1}, "must be >= 0"),
        ({"final_steps": -1}, "must be >= 0"),
        ({"interval": 0}, "interval 0 must be >= 1"),
        ({"initial_steps": 40, "final_steps": 60}, "leave no cubic phase in 100 steps: lower them"),
        ({"initial_steps": 0.1}, "must be a whole number of optimizer steps"),
    ],
)
def test_validation(overrides, message):
    with pytest.raises(ConfigError, match=message):
        schedule(**overrides)


def test_for_steps_validates_too():
    with pytest.raises(ConfigError, match="leave no cubic phase"):
        CubicSchedule.for_steps(10, 0.5, initial_steps=5, final_steps=5)
    with pytest.raises(ConfigError, match="total_steps 0"):
        CubicSchedule.for_steps(0, 0.5)
