"""Timeouts in responsive time: the time servegate's own loop ran late is not counted."""

from __future__ import annotations

import asyncio
import time

import pytest

from proxy.lag import LoopLag, LoopLagged, ResponsiveTimeout


async def started() -> LoopLag:
    lag = LoopLag(tick=0.01)
    lag.start()
    await asyncio.sleep(0.02)
    return lag


async def test_without_lag_it_expires_as_a_plain_timeout_does() -> None:
    lag = await started()
    try:
        with pytest.raises(TimeoutError):
            async with ResponsiveTimeout(0.1, lag) as timeout:
                await asyncio.sleep(10)
        assert timeout.expired()
    finally:
        lag.stop()


async def test_time_the_loop_was_blocked_is_not_counted() -> None:
    lag = await started()
    try:
        # asyncio.timeout(0.2) would expire here: the wall time is 0.6 s.
        async with ResponsiveTimeout(0.2, lag) as timeout:
            time.sleep(0.5)  # noqa: ASYNC251 (servegate's own work, blocking its loop)
            await asyncio.sleep(0.05)
        assert not timeout.expired()
        assert lag.mark() >= 0.4
    finally:
        lag.stop()


async def test_a_wall_clock_bound_makes_a_lagged_wait_inconclusive() -> None:
    lag = await started()
    try:

        async def busy_throughout() -> None:
            async with ResponsiveTimeout(0.2, lag, at_most=0.5):
                for _ in range(10):
                    time.sleep(0.2)  # noqa: ASYNC251
                    await asyncio.sleep(0)

        with pytest.raises(LoopLagged) as caught:
            await busy_throughout()
        assert caught.value.lagged > 0.2
    finally:
        lag.stop()


async def test_an_unstarted_heartbeat_reports_no_lag() -> None:
    lag = LoopLag()
    assert lag.mark() == 0.0

    async def blocked() -> None:
        async with ResponsiveTimeout(0.05, lag):
            time.sleep(0.1)  # noqa: ASYNC251
            await asyncio.sleep(0.01)

    with pytest.raises(TimeoutError):
        await blocked()
