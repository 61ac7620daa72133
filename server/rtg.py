"""The return-to-go (RTG) rules of a session, in one place, with one meaning for each field.

Every row (episode) of a session is conditioned on a return-to-go. An episode starts at the session's
``target`` (the client's ``target_return``, else the model's). Each reward the client reports for the
row's last action counts it down (``rtg -= reward``) and adds to the episode's return. A client may
instead give an explicit rtg (an ``Act`` step's ``rtg``): it replaces the row's value, and from then
on the server no longer knows the episode's return (the reward of the last action was not sent), so
the episode is not recorded; on an episode's first step there was no last action, so it stays known.
An episode that ends adds its last reward to its return; a row that restarts goes back to the target.

Values the client sends must be finite in the model's float32, and so must the rtg they lead to, or
the model's actions would be NaN: :meth:`ReturnsToGo.check_rewards` and
:meth:`ReturnsToGo.check_given` refuse them before anything changes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dmm.server.checks import FLOAT32_MAX, check_float32_rows


class ReturnsToGo:
    """The return-to-go and the return so far of each row of a session.

    ``values[row]`` is what the row's next step is conditioned on; ``returns[row]`` is the sum of the
    rewards of the row's current episode, NaN once an explicit rtg made it unknown."""

    def __init__(self, target: float, rows: int) -> None:
        self.target = target
        self.values = np.full(rows, target, dtype=np.float64)
        self.returns = np.zeros(rows, dtype=np.float64)

    def check_rewards(
        self, rows: np.ndarray, rewards: np.ndarray, restart: np.ndarray, where: Callable[[int], str]
    ) -> None:
        """Refuse (Abort, INVALID_ARGUMENT) a reward outside float32, or one that takes the rtg of a row
        that goes on (not in the mask ``restart``) outside float32; ``where(i)`` names ``rows[i]``.

        The common case, every value fine, is cheap: an Act step's one reward takes two float
        comparisons, a vector step's rewards two reductions; only a bad value takes the checks that
        name it (NaN compares False, so it takes them too)."""
        if rewards.size == 1:
            reward = rewards.item()
            if -FLOAT32_MAX <= reward <= FLOAT32_MAX and (
                restart.item() or -FLOAT32_MAX <= self.values.item(rows.item()) - reward <= FLOAT32_MAX
            ):
                return
        elif rewards.size:
            after = np.where(restart, 0.0, self.values[rows] - rewards)
            if np.abs(rewards).max() <= FLOAT32_MAX and np.abs(after).max() <= FLOAT32_MAX:
                return
        else:
            return
        check_float32_rows("reward", rewards, where)
        going = np.flatnonzero(~restart)
        after = self.values[rows[going]] - rewards[going]
        check_float32_rows("the return-to-go after this reward", after, lambda i: where(int(going[i])))

    @staticmethod
    def check_given(values: np.ndarray, where: Callable[[int], str]) -> None:
        """Refuse (Abort, INVALID_ARGUMENT) an explicit rtg outside float32; ``where(i)`` names value i."""
        check_float32_rows("rtg", values, where)

    def reward(self, rows: np.ndarray, rewards: np.ndarray) -> None:
        """The rewards of the rows' last actions, their episodes going on: the rtg counts down."""
        self.values[rows] -= rewards
        self.returns[rows] += rewards

    def give(self, rows: np.ndarray, values: np.ndarray, first: np.ndarray) -> None:
        """Explicit rtgs from the client; the return of a row not on its episode's first step (the mask
        ``first``) becomes unknown."""
        self.values[rows] = values
        self.returns[rows[~first]] = np.nan

    def finish(self, rows: np.ndarray, rewards: np.ndarray) -> np.ndarray:
        """The rows' episodes ended with these last rewards: their returns (NaN where unknown)."""
        self.returns[rows] += rewards
        return self.returns[rows]

    def restart(self, rows: np.ndarray) -> None:
        """New episodes in ``rows``: back to the target, nothing returned yet."""
        self.values[rows] = self.target
        self.returns[rows] = 0.0

    def known_return(self, row: int) -> float | None:
        """The return so far of ``row``'s episode, None if an explicit rtg made it unknown."""
        value = float(self.returns[row])
        return None if np.isnan(value) else value
