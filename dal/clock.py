"""Time and the waits between retries, injected.

:class:`Clock` is what the cache reads time from and sleeps on: a monotonic
clock for deadlines and expiries, a wall clock for times shared with other
processes (version keys, message timestamps), and ``sleep``. Tests pass a fake
whose ``sleep`` advances its own time, so backoffs and deadlines run without
waiting. :class:`SystemClock` is the default.

:class:`Backoff` is the policy of the waits between attempts: exponential
from ``initial`` up to ``maximum``, optionally jittered by an injected
``random.Random``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    """Where time comes from: ``monotonic()`` and ``wall()`` in seconds, and ``sleep``."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (deadlines, expiries)."""
        ...

    def wall(self) -> float:
        """Seconds since the epoch (times compared across processes)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time."""
        ...


class SystemClock:
    """The system's clocks and ``asyncio.sleep``.

    ``monotonic`` and ``wall`` may be replaced by other time sources (a layer's
    ``clock=`` and ``wall=``); ``sleep`` always waits in real time, so a replaced
    ``monotonic`` must advance with real time, or deadlines measured on it (a
    lease wait) are not reached by sleeping. They are stored as plain
    attributes, so reading the time costs the source's own call and nothing
    more (L1 reads it on every lookup).
    """

    __slots__ = ("monotonic", "wall")

    def __init__(
        self,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.monotonic = monotonic
        self.wall = wall

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def as_clock(
    clock: Clock | Callable[[], float] | None = None, wall: Callable[[], float] | None = None
) -> Clock:
    """``clock`` if it is a :class:`Clock` (then ``wall`` must be ``None``: the Clock has
    one); otherwise a :class:`SystemClock` on the monotonic source ``clock`` and the
    wall source ``wall`` (each defaulting to the system's)."""
    if isinstance(clock, Clock):
        if wall is not None:
            raise TypeError("wall= cannot be given with a Clock: the Clock has its own wall()")
        return clock
    return SystemClock(monotonic=clock or time.monotonic, wall=wall or time.time)


class Backoff:
    """Waits between attempts: ``initial``, then each ``multiplier`` times the last, at
    most ``maximum``; :meth:`reset` starts over (after a success).

    With ``jitter`` ``j > 0`` each wait is scaled by a factor drawn uniformly from
    ``[1 - j, 1 + j]`` with ``rng`` (so many processes retrying the same outage do
    not retry in step); the sequence it scales is unchanged. With ``j = 0`` the
    waits are exact and ``rng`` is never used.

    One object holds one sequence: give each retrying loop its own (:meth:`fresh`
    copies the policy with the sequence at its start).
    """

    __slots__ = ("_next", "initial", "jitter", "maximum", "multiplier", "rng")

    def __init__(
        self,
        initial: float,
        maximum: float,
        *,
        multiplier: float = 2.0,
        jitter: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        if not initial > 0:
            raise ValueError(f"initial must be > 0, got {initial!r}")
        if not maximum >= initial:
            raise ValueError(f"maximum must be >= initial ({initial!r}), got {maximum!r}")
        if not multiplier >= 1:
            raise ValueError(f"multiplier must be >= 1, got {multiplier!r}")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter!r}")
        self.initial = initial
        self.maximum = maximum
        self.multiplier = multiplier
        self.jitter = jitter
        self.rng = rng if rng is not None or jitter == 0 else random.Random()
        self._next = initial

    def next(self) -> float:
        """The wait before the next attempt; advances the sequence."""
        delay = self._next
        self._next = min(delay * self.multiplier, self.maximum)
        if self.jitter:
            assert self.rng is not None
            return delay * (1 + self.rng.uniform(-self.jitter, self.jitter))
        return delay

    def reset(self) -> None:
        """Start the sequence over (the operation succeeded)."""
        self._next = self.initial

    def fresh(self) -> Backoff:
        """The same policy (and ``rng``), its sequence at the start."""
        return Backoff(
            self.initial, self.maximum, multiplier=self.multiplier, jitter=self.jitter, rng=self.rng
        )
