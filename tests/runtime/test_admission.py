"""Bounded concurrency: slots, a bounded queue, hand-over in order, and no leak when a waiter leaves."""

from __future__ import annotations

import asyncio

import pytest

from lmpack.runtime.admission import Admission, Overloaded


def test_slots_then_queue_then_overloaded():
    async def scenario():
        admission = Admission(max_active=1, max_queue=1)
        first = await admission.acquire()
        waiting = asyncio.create_task(admission.acquire())
        await asyncio.sleep(0)
        assert admission.active == 1 and admission.waiting == 1
        with pytest.raises(Overloaded):
            await admission.acquire()
        first.release()
        second = await asyncio.wait_for(waiting, 1)
        assert admission.active == 1 and admission.waiting == 0
        second.release()
        second.release()  # idempotent
        await asyncio.sleep(0)
        assert admission.active == 0

    asyncio.run(scenario())


def test_a_waiter_that_leaves_frees_its_place():
    async def scenario():
        admission = Admission(max_active=1, max_queue=1)
        first = await admission.acquire()
        waiting = asyncio.create_task(admission.acquire())
        await asyncio.sleep(0)
        waiting.cancel()
        await asyncio.sleep(0)
        assert admission.waiting == 0
        first.release()
        await asyncio.sleep(0)
        assert admission.active == 0
        (await admission.acquire()).release()

    asyncio.run(scenario())


def test_zero_queue_refuses_at_once():
    async def scenario():
        admission = Admission(max_active=1, max_queue=0)
        await admission.acquire()
        with pytest.raises(Overloaded):
            await admission.acquire()

    asyncio.run(scenario())
