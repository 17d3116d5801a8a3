"""Concurrent calls merged into batches, each formed when it can start.

Ray Serve's ``@serve.batch`` forms a batch as soon as one request is queued and
only then waits for a free slot (``max_concurrent_batches``). While a batch runs
off the event loop, every request that arrives becomes a batch of its own, queued
behind it: batches of one, and the stages' fixed cost paid per request.
:class:`Merger` waits for a free slot first, then takes everything queued, up to
``max_size``: a batch is whatever arrived while the previous one ran, and a lone
request runs at once.

Clients that were answered together come back together, a few milliseconds apart
(a closed loop: the same callers, each waiting for its answer). A batch formed on the
first of them would run alone, and the rest queue behind it for a whole run. So a
batch smaller than the last one waits up to ``regroup_ms`` for as many as the last had.
A caller alone (the last batch was one) never waits.

With ``in_flight`` above 1, a further batch starts beside those running only when a
full batch waits: ``max_size`` callers, or with ``weight`` (the ingress: a request's
records) that much weight. Below that the callers wait for the running batch and go
together in the next: every batch pays the stages' fixed cost (in a graph, a call to
each stage deployment) once, so on CPUs the stages share, one big batch beats several
small ones at once. Past a full batch, batches overlap: one can be in the model stage
while the next is in the feature stage.

Plain asyncio: the scoring service and the stage deployments both use it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")
R = TypeVar("R")


class BatchOverrides(BaseModel):
    """The ``batch`` section of a deployment's ``user_config``: batching options changed
    on a running app (None: as the spec has it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_size: int | None = Field(default=None, ge=1)
    """Most requests (or frames) merged into one batch."""
    wait_ms: float | None = Field(default=None, ge=0)
    """How long a batch that is not full waits for more."""
    regroup_ms: float | None = Field(default=None, ge=0)
    """How long a batch smaller than the last one waits for as many."""


class Merger(Generic[T, R]):
    """``await merger(item)``: ``run`` is called on a list of concurrent items and returns
    one result per item, in order. At most ``in_flight`` runs at a time, and a run starts
    beside another only with ``max_size`` items (or weight) waiting; a run waits up to
    ``wait_ms`` for more items while it has fewer than ``max_size``, and up to
    ``regroup_ms`` while it has fewer than the previous run had.

    An exception from ``run`` goes to every caller of that batch. A caller cancelled
    before its batch formed is left out of it."""

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[list[R]]],
        *,
        max_size: int,
        wait_ms: float = 0.0,
        regroup_ms: float = 0.0,
        in_flight: int = 1,
        weight: Callable[[T], int] | None = None,
    ) -> None:
        self.run = run
        self.weight = weight
        self._queued = 0
        """Weight of the items queued (their count without ``weight``), kept as they
        come and go: the former checks it on every arrival."""
        self.max_size = max_size
        self.wait_s = wait_ms / 1000
        self.regroup_s = regroup_ms / 1000
        self._last_size = 0
        self._queue: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(in_flight)
        self._former: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    def configure(self, overrides: BatchOverrides) -> None:
        """Change the batch size and waits (None: leave as is); the next batch uses them."""
        if overrides.max_size is not None:
            self.max_size = overrides.max_size
        if overrides.wait_ms is not None:
            self.wait_s = overrides.wait_ms / 1000
        if overrides.regroup_ms is not None:
            self.regroup_s = overrides.regroup_ms / 1000

    async def __call__(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._queued += self._weight(item)
        self._arrived.set()
        if self._former is None or self._former.done():
            self._former = asyncio.create_task(self._form())
        return await future

    async def _form(self) -> None:
        while True:
            await self._slots.acquire()
            # Nothing queued, or a run going and less than a full batch queued: wait
            # (for an arrival, or for a run to end).
            while not self._live() or (self._running and not self._full()):
                self._arrived.clear()
                await self._arrived.wait()
            if self.wait_s > 0 and len(self._queue) < self.max_size:
                await asyncio.sleep(self.wait_s)
            elif self.regroup_s > 0:
                await self._regroup(min(self._last_size, self.max_size))
            batch: list[tuple[T, asyncio.Future[R]]] = []
            while self._queue and len(batch) < self.max_size:
                item, future = self._pop()
                if not future.done():  # a caller that gave up is not scored
                    batch.append((item, future))
            if not batch:
                self._slots.release()
                continue
            self._last_size = len(batch)
            task = asyncio.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _regroup(self, size: int) -> None:
        """Wait up to ``regroup_ms`` until ``size`` items are queued."""
        loop = asyncio.get_running_loop()
        until = loop.time() + self.regroup_s
        while len(self._queue) < size and (left := until - loop.time()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                return

    def _full(self) -> bool:
        """Whether a full batch waits: ``max_size`` items, or that much weight."""
        return len(self._queue) >= self.max_size or self._queued >= self.max_size

    def _weight(self, item: T) -> int:
        return 1 if self.weight is None else self.weight(item)

    def _pop(self) -> tuple[T, asyncio.Future[R]]:
        item, future = self._queue.popleft()
        self._queued -= self._weight(item)
        return item, future

    def _live(self) -> bool:
        """Whether a caller still waits in the queue (cancelled ones are dropped)."""
        while self._queue and self._queue[0][1].done():
            self._pop()
        return bool(self._queue)

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self.run([item for item, _ in batch])
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as e:
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
        finally:
            self._running.discard(asyncio.current_task())
            self._slots.release()
            self._arrived.set()  # a batch waiting for this one to end may start
