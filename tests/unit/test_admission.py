"""Admission: slots, a bounded queue in arrival order, shedding beyond it."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from proxy.admission import Admission, QueueFull
from proxy.config import AdmissionSettings
from proxy.metrics import Metrics


def admission(concurrency: int, queue: int) -> Admission:
    settings = AdmissionSettings(max_concurrency=concurrency, max_queue=queue)
    return Admission(settings, Metrics(CollectorRegistry(), 40))


async def test_beyond_slots_and_queue_requests_are_shed_at_once() -> None:
    gate = admission(1, 1)
    assert await gate.enter(1)
    waiting = asyncio.create_task(gate.enter(1))
    await asyncio.sleep(0)
    with pytest.raises(QueueFull):
        await gate.enter(1)
    gate.leave()
    assert await waiting  # the slot passed to the waiter
    gate.leave()


async def test_a_waiter_whose_budget_ends_leaves_the_queue_and_takes_no_slot() -> None:
    gate = admission(1, 5)
    assert await gate.enter(1)
    assert await gate.enter(0.05) is False
    gate.leave()
    assert await gate.enter(0.05)  # the slot was freed, not leaked


async def test_the_queue_is_served_in_arrival_order() -> None:
    gate = admission(1, 5)
    await gate.enter(1)
    order: list[int] = []

    async def wait(index: int) -> None:
        await gate.enter(5)
        order.append(index)

    tasks = [asyncio.create_task(wait(i)) for i in range(3)]
    await asyncio.sleep(0)
    for _ in range(3):
        gate.leave()
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]


async def test_no_limit_admits_everyone() -> None:
    gate = admission(0, 0)
    assert all([await gate.enter(0) for _ in range(100)])
