"""Bounded concurrency: at most N generations at once, a bounded queue behind them, 429 beyond that.

A CPU serves a few sequences at a time; accepting more only makes every request slow and lets memory
grow without limit. Answering 429 with Retry-After at once lets a client or load balancer go elsewhere.
Counters are touched only on the event loop thread, so they need no lock; worker threads release their
slot through `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio


class Overloaded(Exception):
    """All slots and queue places are taken."""


class Slot:
    """One admitted request's hold on a generation slot; release() is idempotent and thread-safe."""

    def __init__(self, admission: Admission, loop: asyncio.AbstractEventLoop):
        self._admission = admission
        self._loop = loop
        self._released = False

    def release(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._release)
        except RuntimeError:  # the loop has closed (server shut down): nothing left to admit
            pass

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._free()


class Admission:
    def __init__(self, *, max_active: int, max_queue: int):
        if max_active < 1 or max_queue < 0:
            raise ValueError("max_active must be at least 1 and max_queue at least 0")
        self.max_active = max_active
        self.max_queue = max_queue
        self.active = 0
        self.waiting = 0
        self._waiters: list[asyncio.Future] = []

    async def acquire(self) -> Slot:
        """A slot now, or after waiting in the queue; Overloaded when the queue is full too."""
        loop = asyncio.get_running_loop()
        if self.active < self.max_active and not self._waiters:
            self.active += 1
            return Slot(self, loop)
        if len(self._waiters) >= self.max_queue:
            raise Overloaded()
        waiter = loop.create_future()
        self._waiters.append(waiter)
        self.waiting = len(self._waiters)
        try:
            await waiter  # _free() hands its slot over by resolving this future
        except asyncio.CancelledError:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            elif waiter.done() and not waiter.cancelled():
                self._free()  # the slot was handed over just as the client left: pass it on
            raise
        finally:
            self.waiting = len(self._waiters)
        return Slot(self, loop)

    def _free(self) -> None:
        while self._waiters:
            waiter = self._waiters.pop(0)
            self.waiting = len(self._waiters)
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to the first waiter; `active` is unchanged
                return
        self.active -= 1
