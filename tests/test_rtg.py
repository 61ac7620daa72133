"""The return-to-go rules of a session (dmm.server.rtg): target, countdown, explicit rtgs, ends,
restarts and the float32 checks, row by row."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from dmm.server.checks import FLOAT32_MAX, Abort
from dmm.server.rtg import ReturnsToGo

ROWS = np.arange(3)
GOING = np.zeros(3, dtype=bool)


def where(i: int) -> str:
    return f" (row {i})"


def test_every_row_starts_at_the_target_and_rewards_count_it_down() -> None:
    rtg = ReturnsToGo(100.0, 3)
    np.testing.assert_array_equal(rtg.values, [100.0] * 3)
    rtg.reward(ROWS, np.array([1.0, 2.0, 3.0]))
    rtg.reward(np.array([2]), np.array([4.0]))
    np.testing.assert_array_equal(rtg.values, [99.0, 98.0, 93.0])
    np.testing.assert_array_equal(rtg.returns, [1.0, 2.0, 7.0])
    assert rtg.target == 100.0


def test_an_end_adds_the_last_reward_and_gives_the_returns() -> None:
    rtg = ReturnsToGo(10.0, 3)
    rtg.reward(ROWS, np.array([1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(rtg.finish(np.array([2, 0]), np.array([0.5, 4.0])), [3.5, 5.0])
    assert rtg.known_return(1) == 2.0


def test_a_restart_goes_back_to_the_target_and_leaves_other_rows_alone() -> None:
    rtg = ReturnsToGo(10.0, 3)
    rtg.reward(ROWS, np.array([1.0, 2.0, 3.0]))
    rtg.restart(np.array([1]))
    np.testing.assert_array_equal(rtg.values, [9.0, 10.0, 7.0])
    np.testing.assert_array_equal(rtg.returns, [1.0, 0.0, 3.0])


def test_an_explicit_rtg_replaces_the_value_and_makes_a_started_episode_unrecorded() -> None:
    rtg = ReturnsToGo(10.0, 2)
    rtg.give(np.array([0, 1]), np.array([50.0, 60.0]), first=np.array([True, False]))
    np.testing.assert_array_equal(rtg.values, [50.0, 60.0])
    assert rtg.known_return(0) == 0.0  # given on the first step: no reward was missed
    assert rtg.known_return(1) is None  # the last action's reward never came
    rtg.reward(np.array([0, 1]), np.array([5.0, 5.0]))  # counting down goes on from the given value
    np.testing.assert_array_equal(rtg.values, [45.0, 55.0])
    returns = rtg.finish(np.array([0, 1]), np.array([1.0, 1.0]))
    assert returns[0] == 6.0 and np.isnan(returns[1])
    rtg.restart(np.array([1]))  # a new episode is known again
    assert rtg.known_return(1) == 0.0


def test_a_reward_outside_float32_is_refused_naming_its_row() -> None:
    rtg = ReturnsToGo(10.0, 3)
    with pytest.raises(Abort) as info:
        rtg.check_rewards(ROWS, np.array([0.0, np.inf, 0.0]), GOING, where)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details == "reward is inf, outside float32 (row 1)"


def test_a_reward_that_takes_a_going_rows_rtg_outside_float32_is_refused() -> None:
    rtg = ReturnsToGo(-FLOAT32_MAX, 3)
    rewards = np.array([0.0, 0.0, FLOAT32_MAX])
    with pytest.raises(Abort) as info:
        rtg.check_rewards(ROWS, rewards, GOING, where)
    assert info.value.details.startswith("the return-to-go after this reward is -6.8")
    assert info.value.details.endswith("outside float32 (row 2)")
    rtg.check_rewards(ROWS, rewards, np.array([False, False, True]), where)  # restarting: not counted down
    np.testing.assert_array_equal(rtg.values, [-FLOAT32_MAX] * 3)  # checks change nothing


@pytest.mark.parametrize(
    ("reward", "details"),
    [
        (np.nan, "reward is nan, outside float32 (step 7)"),
        (-np.inf, "reward is -inf, outside float32 (step 7)"),
        (1e39, "reward is 1e+39, outside float32 (step 7)"),
        (-FLOAT32_MAX, "the return-to-go after this reward is 4.40282e+38, outside float32 (step 7)"),
    ],
)
def test_one_rows_reward_is_checked_as_a_vector_rows(reward: float, details: str) -> None:
    """An Act step's one reward (the scalar cheap path) is refused with the vector path's messages."""
    rtg = ReturnsToGo(1e38, 1)
    row, going = np.zeros(1, dtype=np.int64), np.zeros(1, dtype=bool)
    with pytest.raises(Abort) as info:
        rtg.check_rewards(row, np.array([reward]), going, lambda _: " (step 7)")
    assert info.value.details == details
    rtg.check_rewards(row, np.array([FLOAT32_MAX]), going, lambda _: "")  # 1e38 - max fits
    if np.isfinite(reward) and abs(reward) <= FLOAT32_MAX:
        rtg.check_rewards(row, np.array([reward]), np.ones(1, dtype=bool), lambda _: "")  # restarting


def test_an_explicit_rtg_outside_float32_is_refused() -> None:
    with pytest.raises(Abort) as info:
        ReturnsToGo.check_given(np.array([1e308]), lambda _: " (step 4)")
    assert info.value.details == "rtg is 1e+308, outside float32 (step 4)"
    ReturnsToGo.check_given(np.array([-FLOAT32_MAX]), lambda _: "")
