"""One generic Ray Serve deployment that runs any segment of stages.

Concurrent requests' DataFrames are merged (:class:`~stageline.batching.Merger`), the stages
run once on the merged frame, and the result is split back per request.
Nothing about a stage is rewritten for Serve: the replica holds a
:class:`stageline.pipeline.StageChain`, exactly what runs in process.
"""

from __future__ import annotations

import functools
import gc
import logging
import time
from collections import deque
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from ray import serve
from ray.serve import metrics

from serve_app.autoscaling import BUSY
from serve_app.ray_internals import keep_grpc_on_loopback
from stageline.batching import Merger
from stageline.pipeline import StageChain
from stageline.service import UserConfig, off_loop
from stageline.spec import PipelineSpec
from stageline.stage import Reading, StageStatus, error_mask, rejections
from stageline.utilization import BusyMeter

log = logging.getLogger("ray.serve")

LATENCY_BOUNDARIES_MS = [0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1e3, 2e3, 5e3]
BATCH_BOUNDARIES = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0]


def freeze_heap() -> None:
    """Leave everything built so far (model, features, Ray, FastAPI) out of the garbage
    collector's full passes. A replica holds some 10^5 long-lived objects; a full pass
    over them is long, and lands on whichever requests are in flight (the p99)."""
    gc.collect()
    gc.freeze()


class _Metrics:
    """The stage metrics of this process, created once (Ray registers them by name)."""

    def __init__(self) -> None:
        self.latency = metrics.Histogram(
            "stageline_stage_latency_ms",
            description="Time one call of a stage segment took (one merged batch).",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=("segment",),
        )
        self.batch_rows = metrics.Histogram(
            "stageline_batch_rows",
            description="Rows per call of a stage segment, after dynamic batching.",
            boundaries=BATCH_BOUNDARIES,
            tag_keys=("segment",),
        )
        self.marked = metrics.Counter(
            "stageline_rows_rejected",
            description="Rows a stage marked bad, by the stage that rejected them.",
            tag_keys=("segment", "stage"),  # type: ignore[arg-type]  # Ray types tag_keys as 1-tuples
        )
        self.model_version = metrics.Gauge(
            "stageline_model_version",
            description="Model version a model stage serves.",
            tag_keys=("segment", "stage", "model"),  # type: ignore[arg-type]
        )
        # What the stages report (stageline.stage.Reading), by reading name.
        self.feature_age_s = metrics.Gauge(
            "stageline_feature_age_s",
            description="Age of the online feature snapshot a feature view was last read "
            "from: seconds since `stageline materialize` wrote it.",
            tag_keys=("view",),
        )
        self.feature_cache_lookups = metrics.Counter(
            "stageline_feature_cache_lookups",
            description="Entity keys looked up in the feature-lookup cache, by result "
            "(hit: served from the cache; miss: read from the online store).",
            tag_keys=("view", "result"),  # type: ignore[arg-type]
        )


@functools.cache
def _metrics() -> _Metrics:
    return _Metrics()


class MeteredChain:
    """A :class:`StageChain` whose every call is measured: latency and rows per call,
    rows rejected by stage, the model versions served. What a stage deployment runs,
    and what the ingress runs for each stage placed inline."""

    def __init__(self, spec: PipelineSpec, stages: list[str], home: str) -> None:
        self.segment = "+".join(stages)
        self.chain = StageChain(spec, stages, Path(home))
        # The load the deployment scales on (serve_app.autoscaling), over the period
        # Serve averages it on.
        self.busy = BusyMeter(spec.stage(stages[0]).serve.autoscaling.look_back_s)
        self.metrics = _metrics()
        self.batch_sizes: deque[int] = deque(maxlen=1000)
        self._models: list[tuple[float, dict[str, str]]] = []
        self._totals: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._report_models()

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        started = time.perf_counter()
        with self.busy:
            out = self.chain(batch)
        m, tags = self.metrics, {"segment": self.segment}
        # Set per batch: a gauge set while the replica is still constructing is not exported.
        for version, model_tags in self._models:
            m.model_version.set(version, tags=model_tags)
        m.latency.observe((time.perf_counter() - started) * 1000, tags=tags)
        m.batch_rows.observe(len(batch), tags=tags)
        self.batch_sizes.append(len(batch))
        bad = error_mask(out) & ~error_mask(batch)
        if bad.any():
            for stage, count in rejections(out, bad).items():
                m.marked.inc(count, tags={"segment": self.segment, "stage": stage})
        self._export(self.chain.readings())
        return out

    def _export(self, readings: list[Reading]) -> None:
        """The stages' readings: a gauge set, a counter increased by what its total
        grew since the last batch."""
        for r in readings:
            tags = dict(r.tags)
            if r.name == "feature_age_s":
                self.metrics.feature_age_s.set(r.value, tags=tags)
            elif r.name == "feature_cache_lookups":
                key = (r.name, tuple(sorted(tags.items())))
                grown = r.value - self._totals.get(key, 0.0)
                self._totals[key] = r.value
                if grown > 0:
                    self.metrics.feature_cache_lookups.inc(grown, tags=tags)

    def reconfigure(self, config: Mapping[str, Mapping[str, Any]]) -> None:
        self.chain.reconfigure(config)
        self._report_models()

    def _report_models(self) -> None:
        self._models = [
            (
                float(s.model.version),
                {"segment": self.segment, "stage": stage, "model": s.model.model},
            )
            for stage, s in self.chain.status().items()
            if s.model is not None
        ]

    def status(self) -> dict[str, StageStatus]:
        return self.chain.status()

    def data_version(self) -> Hashable:
        return self.chain.data_version()


@serve.deployment
class StageDeployment:
    """A Serve replica running ``stages`` of ``spec`` (one stage or a fused group)."""

    def __init__(self, spec: PipelineSpec, stages: list[str], home: str) -> None:
        keep_grpc_on_loopback()
        self.chain = MeteredChain(spec, stages, home)
        # No call outlives the deadline of the requests it serves (see off_loop).
        self.timeout_s = spec.serve.request_timeout_s
        # One chain call at a time (stages need not be thread-safe); without batching,
        # batches of one.
        batching = spec.stage(stages[0]).serve.batch
        self.batching = batching is not None
        self.merger: Merger[pd.DataFrame, pd.DataFrame] = (
            Merger(
                self._merged,
                max_size=batching.max_size,
                wait_ms=batching.wait_ms,
                regroup_ms=batching.regroup_ms,
            )
            if batching is not None
            else Merger(self._merged, max_size=1)
        )
        freeze_heap()

    async def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return await self.merger(batch)

    async def _merged(self, batches: list[pd.DataFrame]) -> list[pd.DataFrame]:
        if len(batches) == 1:
            return [await off_loop(self.chain, batches[0], timeout_s=self.timeout_s)]
        sizes = [len(b) for b in batches]
        merged = await off_loop(
            self.chain, pd.concat(batches, ignore_index=True), timeout_s=self.timeout_s
        )
        bounds = np.cumsum([0, *sizes])
        return [
            merged.iloc[bounds[i] : bounds[i + 1]].set_axis(batches[i].index)
            for i in range(len(batches))
        ]

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What Serve's autoscaler reads of this replica (``serve_app.autoscaling``): the
        share of recent time it spent running its stages."""
        return {BUSY: self.chain.busy.fraction()}

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this on start and on every ``user_config`` change
        (:class:`~stageline.service.UserConfig`): per-stage params and batching."""
        config = UserConfig.model_validate(user_config)
        if self.batching:
            self.merger.configure(config.batch)
        self.chain.reconfigure(config.stages)

    def status(self) -> dict[str, Any]:
        """Stages, what they serve, and the recent batch sizes this replica saw."""
        sizes = self.chain.batch_sizes
        return {
            "segment": self.chain.segment,
            "stages": self.chain.status(),
            "batches": len(sizes),
            "max_batch_rows": max(sizes, default=0),
        }
