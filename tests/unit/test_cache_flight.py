"""SingleFlight: one load per key for concurrent callers; cancellation and errors."""

from __future__ import annotations

import asyncio
import gc

import pytest

from dal.cache.flight import SingleFlight


async def settle() -> None:
    """Let scheduled tasks run (a caller's task, then the load task it starts)."""
    for _ in range(5):
        await asyncio.sleep(0)


class Loader:
    """A load that blocks on ``gate`` and counts its runs."""

    def __init__(self, result: object = "row", error: BaseException | None = None) -> None:
        self.gate = asyncio.Event()
        self.started = 0
        self.finished = 0
        self.cancelled = 0
        self.result = result
        self.error = error

    async def __call__(self) -> object:
        self.started += 1
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.finished += 1
        if self.error is not None:
            raise self.error
        return self.result


async def test_hundred_concurrent_callers_share_one_load() -> None:
    sf: SingleFlight[object] = SingleFlight()
    load = Loader({"id": 1})
    tasks = [asyncio.create_task(sf.do(b"k", load)) for _ in range(100)]
    await settle()
    assert load.started == 1
    assert len(sf) == 1
    load.gate.set()
    results = await asyncio.gather(*tasks)
    assert load.started == 1 and load.finished == 1
    assert all(r == {"id": 1} for r in results)
    assert sf.shared == 99
    assert len(sf) == 0  # done loads are dropped


async def test_distinct_keys_load_separately() -> None:
    sf: SingleFlight[object] = SingleFlight()
    loads = {k: Loader(k) for k in (b"a", b"b", b"c")}
    tasks = [asyncio.create_task(sf.do(k, loads[k])) for k in loads for _ in range(5)]
    await settle()
    for lo in loads.values():
        lo.gate.set()
    results = await asyncio.gather(*tasks)
    assert sorted(set(results)) == [b"a", b"b", b"c"]  # type: ignore[type-var]
    assert [lo.started for lo in loads.values()] == [1, 1, 1]


async def test_cancelled_caller_does_not_cancel_the_load_nor_the_others() -> None:
    sf: SingleFlight[object] = SingleFlight()
    load = Loader("v")
    first = asyncio.create_task(sf.do(b"k", load))
    others = [asyncio.create_task(sf.do(b"k", load)) for _ in range(3)]
    await settle()
    assert load.started == 1
    first.cancel()  # the caller that started the load goes away
    with pytest.raises(asyncio.CancelledError):
        await first
    others[0].cancel()
    with pytest.raises(asyncio.CancelledError):
        await others[0]
    await settle()
    assert load.cancelled == 0
    load.gate.set()
    assert await asyncio.gather(*others[1:]) == ["v", "v"]
    assert load.finished == 1 and load.cancelled == 0


async def test_load_completes_when_every_caller_left() -> None:
    sf: SingleFlight[object] = SingleFlight()
    load = Loader("v")
    callers = [asyncio.create_task(sf.do(b"k", load)) for _ in range(3)]
    await settle()
    for c in callers:
        c.cancel()
    await asyncio.gather(*callers, return_exceptions=True)
    load.gate.set()
    await settle()
    assert load.finished == 1 and load.cancelled == 0
    assert len(sf) == 0


async def test_exception_reaches_every_caller() -> None:
    sf: SingleFlight[object] = SingleFlight()
    load = Loader(error=RuntimeError("db down"))
    tasks = [asyncio.create_task(sf.do(b"k", load)) for _ in range(10)]
    await settle()
    load.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and str(r) == "db down" for r in results)
    assert load.started == 1
    # a failed load is not cached: the next caller loads again
    load2 = Loader("ok")
    load2.gate.set()
    assert await sf.do(b"k", load2) == "ok"


async def test_exception_with_no_caller_left_is_retrieved(recwarn: pytest.WarningsRecorder) -> None:
    sf: SingleFlight[object] = SingleFlight()
    load = Loader(error=RuntimeError("nobody listens"))
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
    try:
        caller = asyncio.create_task(sf.do(b"k", load))
        await settle()
        caller.cancel()
        await asyncio.gather(caller, return_exceptions=True)
        load.gate.set()
        await settle()
        gc.collect()
        await settle()
    finally:
        loop.set_exception_handler(None)
    assert not [r for r in reported if "never retrieved" in str(r.get("message", ""))]


async def test_forget_makes_the_next_caller_start_a_new_load() -> None:
    sf: SingleFlight[object] = SingleFlight()
    old = Loader("old")
    new = Loader("new")
    t_old = asyncio.create_task(sf.do(b"k", old))
    await settle()
    sf.forget(b"k")  # a write of k committed: the running load may be stale
    t_new = asyncio.create_task(sf.do(b"k", new))
    await settle()
    assert old.started == 1 and new.started == 1
    # the old load finishing must not drop the new one from the table
    old.gate.set()
    assert await t_old == "old"
    late = Loader("unused")
    t_late = asyncio.create_task(sf.do(b"k", late))
    await settle()
    assert late.started == 0  # joined the new load
    new.gate.set()
    assert await t_new == "new"
    assert await t_late == "new"
    assert len(sf) == 0


async def test_forget_of_unknown_key_is_harmless() -> None:
    sf: SingleFlight[object] = SingleFlight()
    sf.forget(b"nothing")
    load = Loader(1)
    load.gate.set()
    assert await sf.do(b"nothing", load) == 1
