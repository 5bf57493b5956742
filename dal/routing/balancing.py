"""Replica choice policies.

A :class:`Balancer` picks one node among the *available* replicas of one shard
database. It sees each candidate through the small :class:`Candidate` protocol
(name, weight, in-flight count), never executes anything, and keeps only the
state its policy needs (a round-robin cursor, smooth-weighted counters). One
balancer instance serves one shard database; :func:`balancer_factory` turns a
policy name into a factory so each database gets its own.

Randomness is injected (``rng=``) so distributions are reproducible in tests.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from dal.errors import ConfigError


class Candidate(Protocol):
    """What a balancer may look at on a node."""

    @property
    def name(self) -> str: ...

    @property
    def weight(self) -> int: ...

    @property
    def in_flight(self) -> int: ...


C = TypeVar("C", bound=Candidate)


class Balancer(Protocol):
    """Choose one of ``candidates`` (never empty)."""

    def choose(self, candidates: Sequence[C]) -> C: ...


class RoundRobin:
    """Each candidate in turn."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def choose(self, candidates: Sequence[C]) -> C:
        i = self._next % len(candidates)
        self._next = i + 1
        return candidates[i]


class SmoothWeighted:
    """Smooth weighted round robin, as nginx's ``upstream`` does.

    Each pick adds every candidate's weight to its current weight, chooses the
    largest, and subtracts the total from the chosen one. Over any window of
    ``sum(weights)`` picks each node is chosen exactly ``weight`` times, spread
    out rather than in bursts (weights 5,1,1 give a a b a c a a).
    Counters are keyed by name, so a node leaving and rejoining the candidate
    set (marked down, then up) does not disturb the others.
    """

    __slots__ = ("_current",)

    def __init__(self) -> None:
        self._current: dict[str, int] = {}

    def choose(self, candidates: Sequence[C]) -> C:
        total = 0
        best: C | None = None
        best_weight = 0
        current = self._current
        for c in candidates:
            w = current.get(c.name, 0) + c.weight
            current[c.name] = w
            total += c.weight
            if best is None or w > best_weight:
                best, best_weight = c, w
        assert best is not None
        current[best.name] = best_weight - total
        return best


class LeastConnections:
    """The candidate with the fewest in-flight queries; ties broken round robin.

    The tie-break matters: with an idle system every count is 0, and always
    taking the first candidate would send all sequential traffic to one node.
    """

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def choose(self, candidates: Sequence[C]) -> C:
        n = len(candidates)
        start = self._next % n
        self._next = start + 1
        best = candidates[start]
        for k in range(1, n):
            c = candidates[(start + k) % n]
            if c.in_flight < best.in_flight:
                best = c
        return best


class Random:
    """A uniformly random candidate, weighted by ``weight``."""

    __slots__ = ("_rng",)

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, candidates: Sequence[C]) -> C:
        if len(candidates) == 1:
            return candidates[0]
        return self._rng.choices(candidates, weights=[c.weight for c in candidates])[0]


BalancerFactory = Callable[[], Balancer]

POLICIES: tuple[str, ...] = ("round_robin", "weighted", "least_connections", "random")


def balancer_factory(policy: str, *, rng: random.Random | None = None) -> BalancerFactory:
    """A factory of fresh balancers for ``policy`` (one of :data:`POLICIES`)."""
    if policy == "round_robin":
        return RoundRobin
    if policy == "weighted":
        return SmoothWeighted
    if policy == "least_connections":
        return LeastConnections
    if policy == "random":
        shared = rng or random.Random()
        return lambda: Random(random.Random(shared.random()))
    raise ConfigError("balancing", f"unknown policy {policy!r}; expected one of {list(POLICIES)}")
