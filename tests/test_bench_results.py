"""bench.results: ratios, targets, and a missed target the same work by hand misses too."""

from __future__ import annotations

from bench.results import Result, Target, markdown_table, resolve

HALF = Target("ratio", ">=", 0.5, ">= 0.50 of raw batched")


def held_to_half(rate: float) -> list[Result]:
    """A case held to half the batched loop, listed before its same-work ceiling
    (bare writers making the same commits), which is held to the loop as well."""
    batched = "db-ceiling/batched"
    case = Result(
        "2 append", "16 writers", "append/writers16-1", rate, "events/s", ratio_to=batched
    )
    case.same_work_to, case.targets = "db-ceiling/16-rows-awaited", [HALF]
    return [
        case,
        Result(
            "0 ceiling",
            "bare writers",
            "db-ceiling/16-rows-awaited",
            42.0,
            "rows/s",
            ratio_to=batched,
        ),
        Result("0 ceiling", "batched loop", batched, 100.0, "rows/s"),
    ]


def test_a_miss_the_same_work_by_hand_misses_too_is_out_of_reach() -> None:
    results = held_to_half(30.0)
    resolve(results)
    case = results[0]
    assert case.ratio == 0.3 and case.met is False
    assert case.out_of_reach
    assert "out of reach: the same work by hand reached ratio 0.42" in case.note
    assert "MISSED, out of reach" in markdown_table(results)


def test_a_miss_the_same_work_by_hand_meets_is_only_missed() -> None:
    results = held_to_half(30.0)
    results[1].value = 60.0  # the bare writers reach 0.60
    resolve(results)
    assert results[0].met is False and not results[0].out_of_reach
    assert "out of reach" not in results[0].note
    assert ">= 0.50 of raw batched: MISSED |" in markdown_table(results)


def test_a_met_target_is_never_out_of_reach() -> None:
    results = held_to_half(55.0)
    resolve(results)
    assert results[0].met is True and not results[0].out_of_reach
    assert ">= 0.50 of raw batched: met |" in markdown_table(results)
    assert "1.31 of db-ceiling/16-rows-awaited, the same work by hand" in results[0].note
