"""The scoring service: what serving a pipeline does with records, whatever runs it.

:class:`ScoringService` takes validated records and returns one scored record each
(the :class:`~stageline.outputs.OutputContract`'s columns): concurrent calls merged
into one frame (:class:`~stageline.batching.Merger`), a deadline on each, failures as
the errors below. Where the stages run is a :class:`Runner`'s business: in this
process (:class:`ChainRunner`), or in stage deployments behind handles (the Serve
adapter's). With ``serve.response_cache``, a record answered before is answered again
from a :class:`ResponseCache`, as long as neither the model nor a feature snapshot
changed since. No HTTP, no Ray: a web framework wraps it, and a test calls it directly.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Protocol, TypeVar, cast

import pandas as pd
from pydantic import BaseModel, ConfigDict

from stageline.batching import BatchOverrides, Merger
from stageline.caching import CacheCounts, Clock, TTLCache
from stageline.features import StoreUnavailableError
from stageline.outputs import ERROR, OutputContract, Record
from stageline.predlog import RECEIVED_AT, REQUEST_ID, PredictionLog, sampled
from stageline.spec import PipelineSpec, ResponseCacheSpec
from stageline.stage import StageStatus

T = TypeVar("T")
log = logging.getLogger(__name__)

STATUS_TIMEOUT_S = 5.0
"""How long a readiness check waits for every stage to answer."""


class ServiceError(Exception):
    """A request the service could not score, for a reason the caller may act on."""


class UnavailableError(ServiceError):
    """Scoring cannot happen now (a dependency down, no capacity): retry shortly."""


class DeadlineExceededError(ServiceError):
    """No answer within the deadline; what was still running was abandoned."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no answer within the {seconds:g} s deadline; retry later")
        self.seconds = seconds


class NotReadyError(ServiceError):
    """Not every stage answers its status."""


class UserConfig(BaseModel):
    """A deployment's ``user_config``: what may change on a running app without
    restarting its replicas. Stage names sit under ``stages``, so no stage name can
    collide with a reserved key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stages: dict[str, dict[str, Any]] = {}
    """Per stage, what its ``reconfigure`` gets (``{"model": {"alias": "challenger"}}``;
    a model stage's ``challenger``: ``{"alias": "challenger", "mode": "canary", "share":
    0.1, "sticky_by": "customer_id"}``, or null for none)."""
    batch: BatchOverrides = BatchOverrides()
    """Batching options in place of the spec's."""


class Chain(Protocol):
    """Stages run back to back in this process (a ``StageChain``, or one measured)."""

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame: ...

    def reconfigure(self, config: Mapping[str, Mapping[str, Any]]) -> None: ...

    def status(self) -> dict[str, StageStatus]: ...


class Runner(Protocol):
    """Runs the pipeline's stages on records.

    ``run`` returns one scored record per row, in order. When it is cancelled (the
    deadline passed), it stops what it started: no later stage runs for those rows."""

    async def run(self, rows: list[Record]) -> list[Record]: ...

    async def statuses(self) -> dict[str, StageStatus]: ...

    def reconfigure(self, config: Mapping[str, Mapping[str, Any]]) -> None: ...

    def data_version(self) -> Hashable | None:
        """What changes when data the stages serve from changes (a feature snapshot),
        known without I/O; None when the runner cannot tell (stages in other processes)."""
        ...


async def off_loop(run: Callable[..., T], *args: Any, timeout_s: float | None = None) -> T:
    """``run(*args)`` (stages: plain blocking code) in a worker thread, given up after
    ``timeout_s``.

    On the event loop a slow stage call would hold up every other request, and no
    deadline could fire before it returned. In a thread the loop stays free, and at
    the deadline the caller moves on: Python cannot stop the thread, so the call
    finishes on its own, but nothing waits for it or uses its result."""
    return await asyncio.wait_for(asyncio.to_thread(run, *args), timeout_s)


class AbandonedError(Exception):
    """Raised in a worker thread nobody waits for any more; never seen by a caller."""


class LocalRun:
    """Chains that run in this process back to back: one call in a worker thread.
    Between chains it checks whether the request was abandoned (its deadline passed):
    no chain after that one runs.

    The first run of a request also builds its frame from the rows (with ``start``),
    and a run that ends the pipeline also turns the output into records: the whole
    pandas part of a request in one thread call, not spread over the event loop
    around it."""

    def __init__(
        self,
        chains: list[Chain],
        contract: OutputContract,
        *,
        start: Callable[[list[Record]], pd.DataFrame] | None = None,
    ) -> None:
        self.chains = chains
        self.contract = contract
        self.start = start
        self.last = False

    def __call__(self, data: Any, abandoned: threading.Event) -> Any:
        frame = self.start(data) if self.start is not None else data
        for chain in self.chains:
            if abandoned.is_set():
                raise AbandonedError
            frame = chain(frame)
        return self.contract.records(frame) if self.last else frame

    def reconfigure(self, config: Mapping[str, Mapping[str, Any]]) -> None:
        for chain in self.chains:
            chain.reconfigure(config)

    def statuses(self) -> dict[str, StageStatus]:
        out: dict[str, StageStatus] = {}
        for chain in self.chains:
            out.update(chain.status())
        return out

    def data_version(self) -> Hashable | None:
        """The chains' :meth:`StageChain.data_version`, or None if one cannot tell."""
        versions = []
        for chain in self.chains:
            version = getattr(chain, "data_version", None)
            if version is None:
                return None
            versions.append(version())
        return tuple(versions)


class LocalRuns:
    """Runs :class:`LocalRun` s one at a time, as stages need not be thread-safe (a run
    abandoned at its deadline may still be finishing beside the next one)."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()

    async def __call__(self, run: LocalRun, data: Any, abandoned: threading.Event) -> Any:
        async with self._lock:
            try:
                return await off_loop(run, data, abandoned)
            except asyncio.CancelledError:
                abandoned.set()  # the chains after the running one never start
                raise


def records_to_frame(rows: list[Record]) -> pd.DataFrame:
    """The rows as they are, one column per key: for chains that validate them first."""
    return pd.DataFrame.from_records(rows)


class ChainRunner:
    """Every stage in this process: the ``local`` placement, and ``stageline predict``.

    ``start`` makes the first frame from the records (by default, as they are)."""

    def __init__(
        self,
        chains: Sequence[Chain],
        contract: OutputContract,
        start: Callable[[list[Record]], pd.DataFrame] = records_to_frame,
    ) -> None:
        self.step = LocalRun(list(chains), contract, start=start)
        self.step.last = True
        self.local = LocalRuns()

    async def run(self, rows: list[Record]) -> list[Record]:
        records: list[Record] = await self.local(self.step, rows, threading.Event())
        return records

    async def statuses(self) -> dict[str, StageStatus]:
        return self.step.statuses()

    def reconfigure(self, config: Mapping[str, Mapping[str, Any]]) -> None:
        self.step.reconfigure(config)

    def data_version(self) -> Hashable | None:
        return self.step.data_version()


class LoggedContract(OutputContract):
    """The output contract of a service that logs its predictions: each finished frame
    goes to ``prediction_log`` (its sampled requests) as its records are made, where
    the runner ends (in a worker thread, or on the loop after the last deployment).
    Logging only queues the frame (the log's writer thread shapes and writes it, with
    :func:`~stageline.predlog.scored_rows`); nothing about it fails a request."""

    def __init__(self, spec: PipelineSpec, prediction_log: PredictionLog) -> None:
        super().__init__(spec)
        self.prediction_log = prediction_log
        self.sample = spec.prediction_log.sample

    def records(self, scored: pd.DataFrame) -> list[Record]:
        try:
            kept = (
                scored if self.sample >= 1 else sampled(scored, self.sample, seed_column=REQUEST_ID)
            )
            self.prediction_log.log(kept)
        except Exception:
            log.exception("prediction log: these rows could not be logged")
        return super().records(scored)


class ResponseCache:
    """Answers by validated record (``serve.response_cache``), under the version of
    what produced them: the service's model generation (one more at each reconfigure)
    and the runner's :meth:`~Runner.data_version` (the feature snapshots). An answer
    is served again only while both are what they were when it was computed."""

    def __init__(
        self,
        spec: ResponseCacheSpec,
        runner: Runner,
        clock: Clock = time.monotonic,
        on_lookup: Callable[[int, int], None] | None = None,
    ) -> None:
        self.cache: TTLCache[tuple[Hashable, Hashable], Record] = TTLCache(
            spec.max_entries, spec.ttl_s, clock
        )
        self.runner = runner
        self.generation = 0
        self.on_lookup = on_lookup

    @property
    def counts(self) -> CacheCounts:
        return self.cache.counts

    def version(self) -> Hashable:
        return (self.generation, self.runner.data_version())

    def get(self, version: Hashable, rows: list[Record]) -> list[Record | None]:
        """Each row's cached answer (a copy), or None."""
        keys = [_record_key(row) for row in rows]
        before = self.counts.hits
        got = self.cache.get_many((version, k) for k in keys)
        out = [None if g is None or k is None else dict(g) for g, k in zip(got, keys, strict=True)]
        if self.on_lookup is not None:
            hits = self.counts.hits - before
            self.on_lookup(hits, len(rows) - hits)
        return out

    def put(self, version: Hashable, rows: list[Record], answers: list[Record]) -> None:
        """Keep each answer computed at ``version``, unless the model or a snapshot
        changed during the run, or the row was rejected (a rejection may be passing: a
        stale snapshot, a dependency)."""
        if version != self.version():
            return
        items = []
        for row, answer in zip(rows, answers, strict=True):
            key = _record_key(row)
            if key is not None and answer.get(ERROR) is None:
                items.append(((version, key), dict(answer)))
        self.cache.put_many(items)

    def invalidate(self) -> None:
        """A new model: every answer goes, and none computed before is kept."""
        self.generation += 1
        self.cache.clear()


def _record_key(row: Record) -> Hashable | None:
    """A validated record as a hashable key; None if a value is not hashable."""
    key = tuple(sorted(row.items()))
    try:
        hash(key)
    except TypeError:
        return None
    return key


class ScoringService:
    """Scores validated records with ``runner``, within ``spec``'s deadline.

    Concurrent calls share one frame through every stage when ``spec.serve.ingress``
    has batching: a stage is called once per batch, not once per call. With
    ``serve.response_cache``, a record answered before is answered again from the
    :class:`ResponseCache`; ``on_cache_lookup(hits, misses)`` counts each call's."""

    def __init__(
        self,
        spec: PipelineSpec,
        runner: Runner,
        *,
        on_cache_lookup: Callable[[int, int], None] | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.spec = spec
        self.runner = runner
        self.cache: ResponseCache | None = None
        cache_spec = spec.serve.response_cache
        if cache_spec is not None:
            if runner.data_version() is None:
                log.warning(
                    "serve.response_cache is off: it needs every stage in the ingress (the "
                    "local placement, every stage inline) to see the model or features change"
                )
            else:
                self.cache = ResponseCache(cache_spec, runner, clock, on_cache_lookup)
        self.contract = OutputContract(spec)
        self.timeout_s = spec.serve.request_timeout_s
        batching = spec.serve.ingress.batch
        self.merger: Merger[list[Record], list[Record]] | None = None
        if batching is not None:
            self.merger = Merger(
                self._score_all,
                max_size=batching.max_size,
                wait_ms=batching.wait_ms,
                regroup_ms=batching.regroup_ms,
                in_flight=spec.serve.ingress.in_flight,
                weight=len,  # a request's records: big requests fill a batch sooner
            )

    async def score(self, rows: list[Record], request_id: str | None = None) -> list[Record]:
        """One scored record per row (rejected ones carry ``error``). With the prediction
        log on, each row carries ``request_id`` and its arrival time through the stages.

        Raises :class:`DeadlineExceededError` or :class:`UnavailableError`."""
        if self.cache is None:
            return await self._score(rows, request_id)
        version = self.cache.version()
        answers = self.cache.get(version, rows)
        todo = [i for i, answer in enumerate(answers) if answer is None]
        if todo:
            wanted = [rows[i] for i in todo]
            scored = await self._score(wanted, request_id)
            self.cache.put(version, wanted, scored)
            for i, answer in zip(todo, scored, strict=True):
                answers[i] = answer
        return cast(list[Record], answers)

    async def _score(self, rows: list[Record], request_id: str | None) -> list[Record]:
        if self.spec.prediction_log.enabled:
            now = time.time()
            rows = [{**row, REQUEST_ID: request_id, RECEIVED_AT: now} for row in rows]
        if self.merger is not None:
            return await self.merger(rows)
        return (await self._score_all([rows]))[0]

    async def _score_all(self, calls: list[list[Record]]) -> list[list[Record]]:
        scored = await self._run([row for rows in calls for row in rows])
        out, start = [], 0
        for rows in calls:
            out.append(scored[start : start + len(rows)])
            start += len(rows)
        return out

    async def _run(self, rows: list[Record]) -> list[Record]:
        try:
            return await asyncio.wait_for(self.runner.run(rows), self.timeout_s)
        except asyncio.TimeoutError:
            raise DeadlineExceededError(self.timeout_s) from None
        except StoreUnavailableError as e:
            raise UnavailableError(f"the feature store is unavailable: {e}") from None

    async def ready(self) -> dict[str, StageStatus]:
        """Every stage's status; :class:`NotReadyError` when any does not answer in time."""
        try:
            return await asyncio.wait_for(self.runner.statuses(), STATUS_TIMEOUT_S)
        except Exception as e:  # any failure to answer means not ready
            raise NotReadyError(f"not every stage is ready: {e or type(e).__name__}") from None

    async def models(self) -> list[Record]:
        """The models the stages serve: ``{"stage", "class", "model", "version", ...}``."""
        return [
            {"stage": name, "class": s.stage_class, **s.model.model_dump()}
            for name, s in (await self.ready()).items()
            if s.model is not None
        ]

    def reconfigure(self, config: UserConfig) -> None:
        """A ``user_config`` change: stages reload, batching changes, cached answers go
        (also those of requests still running: the model may be another when they end)."""
        if self.merger is not None:
            self.merger.configure(config.batch)
        if self.cache is not None:
            self.cache.invalidate()
        self.runner.reconfigure(config.stages)
        if self.cache is not None:
            self.cache.invalidate()
