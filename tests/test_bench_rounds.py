"""bench.rounds: a case measured in rounds between runs of its ceiling reports its median round."""

from __future__ import annotations

import pytest

from bench.rounds import Round, median_round, rounds_note


def a_round(rate: float, before: float, after: float) -> Round[str, float]:
    return Round(f"case at {rate}", before, after, rate, (before + after) / 2)


def test_a_round_is_held_to_the_mean_of_the_ceiling_around_it() -> None:
    assert a_round(80, 90, 110).ratio == pytest.approx(0.8)
    assert a_round(80, 0, 0).ratio == 0.0  # no ceiling measured: no ratio, not a crash


def test_the_median_round_is_chosen_by_ratio_not_by_rate() -> None:
    # The fastest case rate fell in the fastest spell of the host: its ratio is the lowest.
    rounds = [a_round(100, 140, 140), a_round(80, 100, 100), a_round(70, 80, 80)]
    assert [round(r.ratio, 3) for r in rounds] == [0.714, 0.8, 0.875]
    assert median_round(rounds) is rounds[1]
    assert median_round(list(reversed(rounds))) is rounds[1]


def test_of_an_even_number_of_rounds_the_lower_middle_one_is_reported() -> None:
    rounds = [
        a_round(90, 100, 100),
        a_round(70, 100, 100),
        a_round(85, 100, 100),
        a_round(60, 100, 100),
    ]
    assert median_round(rounds).rate == 70


def test_no_rounds_is_an_error() -> None:
    with pytest.raises(ValueError, match="no rounds"):
        median_round([])


def test_the_note_lists_every_rounds_ratio_in_order() -> None:
    rounds = [a_round(78, 100, 100), a_round(85, 100, 100), a_round(82, 100, 100)]
    note = rounds_note(rounds, "the no-op")
    assert note == (
        "the median of 3 rounds, each between two runs of the no-op; "
        "the rounds' ratios in order: 0.78, 0.85, 0.82"
    )
    assert rounds_note(rounds[:1], "the no-op") == ""  # one round (the smoke run): nothing to say
