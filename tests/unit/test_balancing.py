"""Replica choice policies, driven with small fake candidates (no nodes, no I/O)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from dal.errors import ConfigError
from dal.routing.balancing import (
    POLICIES,
    LeastConnections,
    Random,
    RoundRobin,
    SmoothWeighted,
    balancer_factory,
)


@dataclass
class Fake:
    name: str
    weight: int = 1
    in_flight: int = 0


def names(picks: list[Fake]) -> str:
    return "".join(p.name for p in picks)


# -- round robin ---------------------------------------------------------------------------


def test_round_robin_cycles_in_order() -> None:
    a, b, c = Fake("a"), Fake("b"), Fake("c")
    rr = RoundRobin()
    assert names([rr.choose([a, b, c]) for _ in range(9)]) == "abcabcabc"


def test_round_robin_is_even_and_ignores_weight_and_load() -> None:
    nodes = [Fake("a", weight=9, in_flight=50), Fake("b"), Fake("c"), Fake("d")]
    rr = RoundRobin()
    counts = Counter(rr.choose(nodes).name for _ in range(4000))
    assert counts == {"a": 1000, "b": 1000, "c": 1000, "d": 1000}


def test_round_robin_survives_a_shrinking_candidate_set() -> None:
    a, b, c = Fake("a"), Fake("b"), Fake("c")
    rr = RoundRobin()
    rr.choose([a, b, c])
    rr.choose([a, b, c])  # cursor now past the end of a 2-element list
    picks = [rr.choose([a, c]) for _ in range(6)]
    assert Counter(p.name for p in picks) == {"a": 3, "c": 3}
    assert rr.choose([b]) is b


# -- smooth weighted (nginx) -----------------------------------------------------------------


def test_smooth_weighted_nginx_sequence() -> None:
    a, b, c = Fake("a", 5), Fake("b", 1), Fake("c", 1)
    sw = SmoothWeighted()
    assert names([sw.choose([a, b, c]) for _ in range(7)]) == "aabacaa"
    # and again, identically, in every following window
    assert names([sw.choose([a, b, c]) for _ in range(14)]) == "aabacaa" * 2


def test_smooth_weighted_exact_proportions() -> None:
    a, b, c = Fake("a", 5), Fake("b", 1), Fake("c", 1)
    sw = SmoothWeighted()
    seq = names([sw.choose([a, b, c]) for _ in range(7000)])
    assert Counter(seq) == {"a": 5000, "b": 1000, "c": 1000}
    # exactly weight picks in every window of sum(weights) picks
    for i in range(0, 7000, 7):
        assert Counter(seq[i : i + 7]) == {"a": 5, "b": 1, "c": 1}, i


def test_smooth_weighted_other_weights() -> None:
    nodes = [Fake("a", 3), Fake("b", 2), Fake("c", 1)]
    sw = SmoothWeighted()
    seq = names([sw.choose(nodes) for _ in range(600)])
    assert seq[:6] == "abacba"  # spread out, not "aaabbc"
    assert Counter(seq) == {"a": 300, "b": 200, "c": 100}
    assert "aaa" not in seq and "bb" not in seq


def max_drift(seq: str, weights: dict[str, int]) -> float:
    """Largest gap, over every prefix, between a node's picks and its ideal share."""
    total = sum(weights.values())
    counts: Counter[str] = Counter()
    worst = 0.0
    for i, ch in enumerate(seq, 1):
        counts[ch] += 1
        for n, w in weights.items():
            worst = max(worst, abs(counts[n] - i * w / total))
    return worst


@pytest.mark.parametrize("before", range(8))
@pytest.mark.parametrize("absent", [0, 1, 2, 5, 6, 13, 40])
def test_smooth_weighted_node_leaves_and_rejoins(before: int, absent: int) -> None:
    a, b, c = Fake("a", 5), Fake("b", 1), Fake("c", 1)
    sw = SmoothWeighted()
    for _ in range(before):
        sw.choose([a, b, c])
    # b is marked down: it is never picked, a and c share 5:1
    gone = names([sw.choose([a, c]) for _ in range(absent)])
    assert "b" not in gone
    assert max_drift(gone, {"a": 5, "c": 1}) < 2
    # b is back: it gets its share again, and nobody drifts by more than one pick
    back = names([sw.choose([a, b, c]) for _ in range(7000)])
    counts = Counter(back)
    for n, share in (("a", 5000), ("b", 1000), ("c", 1000)):
        assert abs(counts[n] - share) <= 1, counts
    assert max_drift(back, {"a": 5, "b": 1, "c": 1}) < 2
    assert "b" in back[:14]


def test_smooth_weighted_rejoin_at_a_window_boundary_resumes_the_exact_sequence() -> None:
    a, b, c = Fake("a", 5), Fake("b", 1), Fake("c", 1)
    sw = SmoothWeighted()
    assert names([sw.choose([a, b, c]) for _ in range(7)]) == "aabacaa"
    assert names([sw.choose([a, c]) for _ in range(6)]) == "aaacaa"
    assert names([sw.choose([a, b, c]) for _ in range(14)]) == "aabacaa" * 2


def test_smooth_weighted_new_node_joins() -> None:
    a, c = Fake("a", 5), Fake("c", 1)
    sw = SmoothWeighted()
    for _ in range(13):
        sw.choose([a, c])
    b = Fake("b", 1)
    back = names([sw.choose([a, b, c]) for _ in range(7000)])
    counts = Counter(back)
    assert abs(counts["b"] - 1000) <= 1 and abs(counts["a"] - 5000) <= 1


def test_smooth_weighted_single_candidate() -> None:
    a = Fake("a", 3)
    sw = SmoothWeighted()
    assert all(sw.choose([a]) is a for _ in range(10))


# -- least connections ---------------------------------------------------------------------


def test_least_connections_picks_the_minimum() -> None:
    nodes = [Fake("a", in_flight=5), Fake("b", in_flight=2), Fake("c", in_flight=9)]
    lc = LeastConnections()
    assert all(lc.choose(nodes).name == "b" for _ in range(20))
    nodes[2].in_flight = 0
    assert all(lc.choose(nodes).name == "c" for _ in range(20))


def test_least_connections_ties_rotate() -> None:
    nodes = [Fake("a"), Fake("b"), Fake("c")]
    lc = LeastConnections()
    counts = Counter(lc.choose(nodes).name for _ in range(300))
    assert counts == {"a": 100, "b": 100, "c": 100}


def test_least_connections_ties_rotate_among_the_minimum_only() -> None:
    nodes = [Fake("a", in_flight=1), Fake("b", in_flight=3), Fake("c", in_flight=1), Fake("d", in_flight=1)]
    lc = LeastConnections()
    counts = Counter(lc.choose(nodes).name for _ in range(400))
    assert "b" not in counts
    assert max(counts.values()) - min(counts.values()) <= 100, counts
    assert set(counts) == {"a", "c", "d"}


def test_least_connections_follows_load() -> None:
    """Simulate long requests: each pick holds a connection, so load stays level."""
    nodes = [Fake("a"), Fake("b"), Fake("c")]
    lc = LeastConnections()
    for _ in range(30):
        lc.choose(nodes).in_flight += 1
    assert [n.in_flight for n in nodes] == [10, 10, 10]


# -- random ---------------------------------------------------------------------------------


def test_random_is_reproducible_with_a_seed() -> None:
    nodes = [Fake("a", 2), Fake("b", 1), Fake("c", 1)]
    one = Random(random.Random(1234))
    two = Random(random.Random(1234))
    assert names([one.choose(nodes) for _ in range(500)]) == names([two.choose(nodes) for _ in range(500)])
    f1, f2 = balancer_factory("random", rng=random.Random(99)), balancer_factory("random", rng=random.Random(99))
    assert names([f1().choose(nodes) for _ in range(200)]) == names([f2().choose(nodes) for _ in range(200)])


def test_random_is_weight_proportional() -> None:
    weights = {"a": 5, "b": 3, "c": 1, "d": 1}
    nodes = [Fake(n, w) for n, w in weights.items()]
    rnd = Random(random.Random(20240601))
    picks = 100_000
    counts = Counter(rnd.choose(nodes).name for _ in range(picks))
    total = sum(weights.values())
    chi2 = sum((counts[n] - picks * w / total) ** 2 / (picks * w / total) for n, w in weights.items())
    # 3 degrees of freedom: P(chi2 > 16.27) = 0.001. The seed is fixed, so no flakes.
    assert chi2 < 16.27, (chi2, counts)


def test_random_single_candidate_draws_nothing() -> None:
    class NoRng(random.Random):
        def choices(self, *a: object, **k: object) -> list[object]:  # type: ignore[override]
            raise AssertionError("must not draw for a single candidate")

    a = Fake("a")
    assert Random(NoRng()).choose([a]) is a


# -- factory ----------------------------------------------------------------------------------


def test_factory_unknown_policy() -> None:
    with pytest.raises(ConfigError) as ei:
        balancer_factory("nope")
    assert ei.value.field == "balancing"
    assert "nope" in str(ei.value)


@pytest.mark.parametrize(
    ("policy", "cls"),
    [("round_robin", RoundRobin), ("weighted", SmoothWeighted), ("least_connections", LeastConnections),
     ("random", Random)],
)
def test_factory_gives_independent_balancers(policy: str, cls: type) -> None:
    assert policy in POLICIES
    factory = balancer_factory(policy, rng=random.Random(5))
    one, two = factory(), factory()
    assert isinstance(one, cls) and isinstance(two, cls)
    assert one is not two
    nodes = [Fake("a", 2), Fake("b", 1), Fake("c", 1)]
    if policy != "random":
        # State is per balancer: using one does not move the other.
        first = names([one.choose(nodes) for _ in range(3)])
        assert names([two.choose(nodes) for _ in range(3)]) == first
    else:
        # Each gets its own generator (seeded from the shared one): not the same stream.
        s1 = names([one.choose(nodes) for _ in range(64)])
        s2 = names([two.choose(nodes) for _ in range(64)])
        assert s1 != s2


def test_policies_cover_every_factory_name() -> None:
    assert set(POLICIES) == {"round_robin", "weighted", "least_connections", "random"}
    for p in POLICIES:
        assert callable(balancer_factory(p))
