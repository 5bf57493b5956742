"""RetryQueue: failed cache operations are retried until done, and counted while pending."""

from __future__ import annotations

import asyncio

from dal.cache.invalidation import RetryQueue


class Op:
    """Fails until ``ok`` is set; counts attempts."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.ok = False
        self.attempts = 0
        self.log = log

    async def __call__(self) -> bool:
        self.attempts += 1
        if self.ok:
            self.log.append(self.name)
        return self.ok


async def test_pending_counts_the_operation_being_retried() -> None:
    q = RetryQueue(initial=0.001, maximum=0.005)
    q.start()
    try:
        done: list[str] = []
        delete, publish = Op("delete", done), Op("publish", done)
        q.put(delete)
        q.put(publish)
        assert q.pending == 2
        await asyncio.sleep(0.02)
        assert delete.attempts >= 2  # being retried ...
        assert q.pending == 2  # ... and still counted
        assert publish.attempts == 0  # in order: the next one waits
        delete.ok = publish.ok = True
        await q.drain(2.0)
        assert q.pending == 0
        assert done == ["delete", "publish"]
        assert q.failures == 2
        await q.drain(0.1)
    finally:
        await q.aclose()


async def test_an_op_that_raises_does_not_kill_the_queue() -> None:
    q = RetryQueue(initial=0.001, maximum=0.002)
    q.start()
    try:
        calls = 0

        async def flaky() -> bool:
            nonlocal calls
            calls += 1
            if calls < 3:
                raise RuntimeError("boom")
            return True

        q.put(flaky)
        await q.drain(2.0)
        assert q.pending == 0
        assert calls == 3
    finally:
        await q.aclose()
