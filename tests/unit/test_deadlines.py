"""Deadlines on one timer behave as asyncio.timeout does, and forget the scopes left early."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from proxy.deadlines import Deadlines


async def test_a_block_that_outlives_its_deadline_ends_in_timeout_error() -> None:
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    deadline = deadlines.scope(0.05)
    with pytest.raises(TimeoutError):
        async with deadline:
            await asyncio.sleep(5)
    assert deadline.expired()
    assert loop.time() >= deadline.when
    assert deadlines.waiting == 0


async def test_a_block_that_ends_first_is_not_touched() -> None:
    deadlines = Deadlines()
    deadline = deadlines.scope(0.05)
    async with deadline:
        await asyncio.sleep(0)
    await asyncio.sleep(0.1)  # past the deadline: nothing is cancelled any more
    assert not deadline.expired()
    assert deadlines.waiting == 0


async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    deadlines = Deadlines()
    entered = asyncio.Event()

    async def attempt() -> None:
        async with deadlines.scope(5):
            entered.set()
            await asyncio.sleep(5)

    task = asyncio.create_task(attempt())
    await entered.wait()
    task.cancel()  # the client hung up
    with pytest.raises(asyncio.CancelledError):
        await task
    assert deadlines.waiting == 0


async def test_an_earlier_deadline_added_later_wakes_the_timer_earlier() -> None:
    deadlines = Deadlines()
    async with asyncio.timeout(2):  # a bound for the test, not a measurement
        async with deadlines.scope(30):
            with pytest.raises(TimeoutError):
                async with deadlines.scope(0.05):
                    await asyncio.sleep(5)
    assert deadlines.waiting == 0


async def test_each_of_many_blocks_meets_its_own_deadline() -> None:
    deadlines = Deadlines()

    async def attempt(delay: float, sleep: float) -> bool:
        try:
            async with deadlines.scope(delay):
                await asyncio.sleep(sleep)
        except TimeoutError:
            return False
        return True

    cases = [(0.02 * (i % 5 + 1), 0.2 if i % 2 else 0.0) for i in range(50)]
    finished = await asyncio.gather(*(attempt(delay, sleep) for delay, sleep in cases))
    assert finished == [sleep == 0.0 for _, sleep in cases]
    assert deadlines.waiting == 0


async def test_scopes_left_early_do_not_pile_up() -> None:
    deadlines = Deadlines()
    for _ in range(10_000):
        async with deadlines.scope(60):
            pass
    assert deadlines.waiting == 0
    assert deadlines.entries <= 2 * 1024 + 2


async def test_a_scope_left_early_keeps_no_task_alive() -> None:
    deadlines = Deadlines()

    async def attempt() -> None:
        async with deadlines.scope(60):
            await asyncio.sleep(0)

    task = asyncio.create_task(attempt())
    await task
    finished = weakref.ref(task)
    del task
    await asyncio.sleep(0)  # the callback that woke this test held the task until now
    gc.collect()
    assert deadlines.entries == 1  # still in the heap until it surfaces
    assert finished() is None
