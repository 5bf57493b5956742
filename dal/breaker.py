"""A small circuit breaker: stop waiting on a dependency that keeps failing.

``closed`` lets calls through and counts consecutive failures; at
``failures`` it opens and :meth:`allow` says no (the caller skips the
dependency at once instead of waiting out a timeout) until ``reset`` seconds
pass; then one trial call is let through (half-open): success closes it,
failure opens it again. ``on_close`` runs when it closes after having opened,
which is when a cache must assume it missed invalidations. Time is injected.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from dal.events import BreakerChanged, Events


class Breaker:
    __slots__ = (
        "_clock", "_events", "_failures", "_on_close", "_opened_at", "_trial", "failures", "name", "reset", "trips",
    )

    def __init__(
        self,
        name: str,
        *,
        failures: int = 3,
        reset: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        on_close: Callable[[], None] | None = None,
        events: Events | None = None,
    ) -> None:
        """``events``: where its changes between closed and open are reported."""
        self.name = name
        self.failures = failures
        self.reset = reset
        self._clock = clock
        self._on_close = on_close
        self._events = events
        self._failures = 0
        self._opened_at: float | None = None
        self._trial = False
        self.trips = 0

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        return "half-open" if self._clock() - self._opened_at >= self.reset else "open"

    def allow(self) -> bool:
        """Whether to try the dependency now."""
        if self._opened_at is None:
            return True
        if self._clock() - self._opened_at >= self.reset and not self._trial:
            self._trial = True
            return True
        return False

    def success(self) -> None:
        self._failures = 0
        if self._opened_at is not None:
            self._opened_at = None
            self._trial = False
            self._changed("closed", "open")
            if self._on_close is not None:
                self._on_close()

    def abandon(self) -> None:
        """A call that was let through ended without an outcome (cancelled, or an
        unexpected error). If it was the half-open trial, the next call may be a
        trial; without this the breaker would wait forever for that outcome."""
        self._trial = False

    def failure(self) -> None:
        self._failures += 1
        if self._opened_at is not None:
            self._opened_at = self._clock()  # the trial failed: stay open
            self._trial = False
        elif self._failures >= self.failures:
            self._opened_at = self._clock()
            self.trips += 1
            self._changed("open", "closed")

    def _changed(self, state: str, previous: str) -> None:
        if self._events is not None and self._events.breaker:
            self._events.emit(BreakerChanged(self.name, state, previous))
