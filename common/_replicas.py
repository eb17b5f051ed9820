"""
Which control service replica a client talks to next: a pure core (no IO; chance and time
are parameters) shared by the agent channel and the REST client (issue 9).

A client knows the replicas' addresses in a fixed order and starts at one of them
(``start``; agents pick one at random so that they spread over the replicas). When the
replica it uses closes the connection, goes silent or refuses it, the client moves to the
next one at once; only when every replica has failed in a row (a full round) does it wait,
with exponential backoff and jitter so that a whole cluster of agents does not come back in
step. A replica that answers (``succeeded``) starts a new round from where it is.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

import attr

#: The first wait after a full round of failures, in seconds.
FIRST_DELAY = 0.5

#: Each full round of failures multiplies the wait by this.
FACTOR = 2.0

#: The longest wait between rounds, in seconds.
MAX_DELAY = 30.0

T = TypeVar("T")


@attr.s(frozen=True, auto_attribs=True)
class ReplicaOrder:
    """
    Where a client is in its list of ``count`` replicas: ``current`` is the index of the
    replica to use, ``failed`` how many replicas failed in a row since one last answered,
    ``rounds`` how many full rounds have failed since then.
    """

    count: int
    current: int = 0
    failed: int = 0
    rounds: int = 0

    def __attrs_post_init__(self) -> None:
        if self.count < 1:
            raise ValueError("a client needs at least one control service address")
        if not 0 <= self.current < self.count:
            raise ValueError(f"replica {self.current} is not one of {self.count}")

    @classmethod
    def starting_at(cls, count: int, chance: float) -> "ReplicaOrder":
        """An order over ``count`` replicas starting at the one ``chance`` (in [0, 1))
        picks, so that clients started together spread over the replicas."""
        return cls(count=count, current=min(count - 1, int(chance * count)))

    def succeeded(self) -> "ReplicaOrder":
        """The current replica answered: a later failure starts a new round."""
        return attr.evolve(self, failed=0, rounds=0)

    def answered(self, index: int) -> "ReplicaOrder":
        """Replica ``index`` answered: use it from now on, starting a new round."""
        return attr.evolve(self, current=index, failed=0, rounds=0)

    def failed_over(self, chance: float = 0.0) -> tuple["ReplicaOrder", float]:
        """
        The current replica closed, went silent or refused: the order moved on to the next
        replica, and the seconds to wait before trying it (0 unless this failure completed
        a full round; then a backoff of which ``chance`` in [0, 1) picks the jitter).
        """
        failed = self.failed + 1
        rounds = self.rounds
        delay = 0.0
        if failed >= self.count:
            rounds += 1
            failed = 0
            delay = backoff(rounds, chance)
        return (attr.evolve(self, current=(self.current + 1) % self.count, failed=failed,
                            rounds=rounds), delay)

    def pick(self, items: Sequence[T]) -> T:
        """The current replica's item of ``items`` (one per replica, in order)."""
        return items[self.current]


def backoff(rounds: int, chance: float) -> float:
    """The wait after ``rounds`` full rounds of failures: doubling from ``FIRST_DELAY`` up
    to ``MAX_DELAY``, of which a random half (``chance`` in [0, 1)) is jitter."""
    full = min(MAX_DELAY, FIRST_DELAY * FACTOR ** (max(1, rounds) - 1))
    return full / 2 + full / 2 * chance


__all__ = ["FACTOR", "FIRST_DELAY", "MAX_DELAY", "ReplicaOrder", "backoff"]
