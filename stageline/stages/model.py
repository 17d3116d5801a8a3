"""XGBoostPredictor: score rows with a registered XGBoost model."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import pandas as pd
import xgboost as xgb

from stageline.context import StageContext
from stageline.registry import LoadedModel, RegistryError
from stageline.stage import BaseStage, ServedModel, StageStatus, mark_errors
from stageline.stages.transform import apply_encoders, encoder_outputs

log = logging.getLogger(__name__)


class XGBoostPredictor(BaseStage):
    """Loads ``model`` at ``alias`` (or a pinned ``version``) and adds its score.

    Columns added, prefixed by ``output`` (default ``score``): the score, the
    model's threshold, name and version, and with ``reasons: k`` the ``k``
    features that pushed the score up most: XGBoost's feature contributions,
    ``reasons_method: approx`` (Saabas, ~80x cheaper, the default) or
    ``exact`` (TreeSHAP, ~0.5 ms per row on one core).
    Several predictors with different ``output`` names make an ensemble; a
    later model may use an earlier one's score as a feature.
    """

    def __init__(
        self,
        *,
        model: str,
        context: StageContext,
        alias: str | None = None,
        version: int | None = None,
        output: str = "score",
        reasons: int = 0,
        reasons_method: Literal["approx", "exact"] = "approx",
        nthread: int = 1,
    ) -> None:
        super().__init__(name=context.stage_name)
        if alias is not None and version is not None:
            raise ValueError("give either alias or version, not both")
        self.registry = context.registry()
        self.model_name = model
        self.output = output
        self.reasons = reasons
        self.approx_reasons = reasons_method == "approx"
        self.nthread = nthread
        self.load_error: str | None = None
        self.ref: str | int = version if version is not None else alias or "champion"
        self.loaded = self._load(self.ref)

    # -- lifecycle -------------------------------------------------------------

    def _load(self, ref: str | int) -> LoadedModel:
        loaded = self.registry.load(self.model_name, ref)
        loaded.booster.set_param({"nthread": self.nthread})
        return loaded

    def reconfigure(self, params: Mapping[str, Any]) -> None:
        """Swap to another alias or version; on failure keep serving the current one."""
        ref: str | int = params.get("version") or params.get("alias") or "champion"
        try:
            # The alias may have moved since it was loaded: resolve it afresh (cheap).
            target = self.registry.resolve(self.model_name, ref)
            if target.version == self.loaded.metadata.version:
                self.ref, self.load_error = ref, None
                return
            loaded = self._load(target.version)
        except RegistryError as e:
            self.load_error = f"{self.model_name}@{ref}: {e}"
            log.error("stage %r keeps serving %s: %s", self.name, self.describe(), e)
            return
        self.loaded, self.ref, self.load_error = loaded, ref, None
        log.info("stage %r now serves %s", self.name, self.describe())

    def describe(self) -> str:
        meta = self.loaded.metadata
        return f"{meta.name} v{meta.version}"

    def status(self) -> StageStatus:
        """What this stage serves, for ``/models`` and ``/readyz``."""
        meta = self.loaded.metadata
        served = ServedModel(
            model=meta.name,
            version=meta.version,
            ref=self.ref,
            sha256=meta.sha256,
            threshold=meta.threshold,
            metrics=meta.metrics,
            load_error=self.load_error,
        )
        return StageStatus(model=served)

    # -- inference -------------------------------------------------------------

    def required_columns(self) -> tuple[str, ...]:
        meta = self.loaded.metadata
        encoded = set(encoder_outputs(meta.encoders))
        return (*(f for f in meta.features if f not in encoded), *meta.encoders)

    def provided_columns(self) -> tuple[str, ...]:
        cols = [self.output, *(f"{self.output}_{s}" for s in ("threshold", "model", "version"))]
        if self.reasons:
            cols.append(f"{self.output}_reasons")
        return tuple(cols)

    def features(
        self, batch: pd.DataFrame, loaded: LoadedModel | None = None
    ) -> np.ndarray[Any, Any]:
        """The model's feature matrix for ``batch``, in the order the model was trained on."""
        meta = (loaded or self.loaded).metadata
        frame = apply_encoders(batch, meta.encoders) if meta.encoders else batch
        with np.errstate(over="ignore"):  # too large for float32 is inf: process() marks it
            return frame[list(meta.features)].to_numpy(dtype=np.float32, na_value=np.nan)

    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        loaded = self.loaded  # one version for the whole batch, even mid-reload
        meta = loaded.metadata
        matrix = self.features(batch, loaded)
        # NaN is XGBoost's missing value, but an infinite feature (a corrupt upstream
        # value, or one too large for the model's float32) makes XGBoost refuse the whole
        # batch: such a row is marked bad and the others are scored.
        infinite = np.isinf(matrix)
        bad = infinite.any(axis=1)
        good = matrix[~bad] if bad.any() else matrix
        scores = np.full(len(batch), np.nan)
        if len(good):
            predicted = loaded.booster.inplace_predict(good, validate_features=False)
            scores[~bad] = np.asarray(predicted, dtype=np.float64)
        out = batch.copy()
        out[self.output] = scores
        out[f"{self.output}_threshold"] = meta.threshold
        out[f"{self.output}_model"] = meta.name
        out[f"{self.output}_version"] = meta.version
        if self.reasons:
            top = self._top_reasons(loaded, good) if len(good) else []
            if bad.any():
                reasons: list[list[str] | None] = [None] * len(batch)
                for i, row in zip(np.flatnonzero(~bad), top, strict=True):
                    reasons[i] = row
                out[f"{self.output}_reasons"] = pd.Series(reasons, index=out.index, dtype=object)
            else:
                out[f"{self.output}_reasons"] = top
        if bad.any():
            names = np.array(meta.features, dtype=object)
            why = np.full(len(batch), "", dtype=object)
            for i in np.flatnonzero(bad):
                why[i] = f"{', '.join(names[infinite[i]])}: not a finite number"
            mark_errors(out, bad, self.name, why)
        return out

    def _top_reasons(self, loaded: LoadedModel, matrix: np.ndarray[Any, Any]) -> list[list[str]]:
        names = np.array(loaded.metadata.features, dtype=object)
        dmatrix = xgb.DMatrix(matrix, feature_names=list(names), nthread=self.nthread)
        contribs = loaded.booster.predict(
            dmatrix, pred_contribs=True, approx_contribs=self.approx_reasons
        )[:, :-1]  # the last column is the bias
        k = min(self.reasons, contribs.shape[1])
        top = np.argsort(-contribs, axis=1, kind="stable")[:, :k]
        return [list(row) for row in names[top]]
