"""XGBoostPredictor: score rows with a registered XGBoost model, of any task."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import xgboost as xgb
from pydantic import ValidationError

from stageline.challenger import (
    CANARY,
    CHALLENGER,
    CHAMPION,
    SHADOW,
    in_canary,
    mode_column,
    role_column,
    shadow_output,
)
from stageline.context import StageContext
from stageline.outputs import MODEL
from stageline.registry import LoadedModel, ModelMetadata, RegistryError, Task
from stageline.spec import resolve_class
from stageline.spec_challenger import ChallengerSpec
from stageline.stage import (
    BaseStage,
    ServedModel,
    StageError,
    StageStatus,
    mark_errors,
    with_columns,
)
from stageline.stages.transform import encoded, encoder_outputs

log = logging.getLogger(__name__)

MODEL_NAME, MODEL_VERSION = (m.name for m in MODEL)


class ModelTaskError(StageError):
    """The registered model's task is not the one the stage was configured for."""


Predicted = tuple[dict[str, Any], np.ndarray[Any, np.dtype[np.bool_]], np.ndarray[Any, Any] | None]
"""A model's columns for a batch, the rows it could not score, and why (None: none)."""


@dataclass(frozen=True)
class Challenger:
    """A loaded challenger and how it takes part (shadow, or a canary share)."""

    spec: ChallengerSpec
    loaded: LoadedModel
    sticky_by: str
    """The column that names the entity (canary)."""


class XGBoostPredictor(BaseStage):
    """Loads ``model`` at ``alias`` (or a pinned ``version``) and adds its prediction.

    ``task`` is what the stage (and the outputs the spec declares from it) expects:
    ``binary`` (the default), ``regression`` or ``multiclass``. A model registered
    for another task is refused at load and at reload, naming both.

    Columns added, prefixed by ``output`` (default ``score``; written ``<o>``):

    - binary: ``<o>`` the score, ``<o>_threshold`` the model's threshold;
    - regression: ``<o>`` the prediction;
    - multiclass: ``<o>_class`` the most probable class's name, ``<o>`` its
      probability, and ``<o>_p_<class>`` the probability of each class;
    - every task: ``<o>_model`` and ``<o>_version``, the model's name and version
      (also as ``model_name`` and ``model_version``, the model every answer
      reports, with ``model_identity: true``: for a pipeline without ``Decision``);
      with ``reasons: k``, ``<o>_reasons``: the ``k`` features that pushed the
      score, the prediction or the predicted class's probability up most.

    Reasons are XGBoost's feature contributions, ``reasons_method: approx``
    (Saabas, ~80x cheaper, the default) or ``exact`` (TreeSHAP, ~0.5 ms per row
    on one core). A binary model explains only the rows it labels positive (score
    at or over the model version's threshold), as adverse-action codes do: the others
    get an empty list, and contributions cost about four times the prediction itself
    (``bench/results/request-path/README.md``). ``reasons_for: all`` explains every row (and a
    Decision stage that pins its own threshold wants that). Other tasks explain every
    row. Several predictors with different ``output`` names make an
    ensemble; a later model may use an earlier one's score as a feature.

    ``challenger`` (the stage spec's ``challenger:``, a
    :class:`~stageline.spec_challenger.ChallengerSpec`) scores another version of the
    model beside the champion: in ``shadow`` mode every row, its predictions under
    ``<o>_challenger...`` for the prediction log only; in ``canary`` mode it answers the
    rows of a sticky share of entities. Either way ``<o>_role`` and ``<o>_mode`` say who
    answered (:mod:`stageline.challenger`). These columns are not among
    ``provided_columns``: they come and go as the challenger is switched at run time.
    """

    def __init__(
        self,
        *,
        model: str,
        context: StageContext,
        alias: str | None = None,
        version: int | None = None,
        task: Task = "binary",
        output: str = "score",
        reasons: int = 0,
        reasons_method: Literal["approx", "exact"] = "approx",
        reasons_for: Literal["positive", "all"] = "positive",
        model_identity: bool = False,
        nthread: int = 1,
        challenger: ChallengerSpec | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(name=context.stage_name)
        if alias is not None and version is not None:
            raise ValueError("give either alias or version, not both")
        _check_alone(context, output, model_identity)
        self.registry = context.registry()
        self.model_name = model
        self.task = task
        self.output = output
        self.model_identity = model_identity
        self.reasons = reasons
        self.approx_reasons = reasons_method == "approx"
        if reasons_for not in ("positive", "all"):
            raise ValueError(f"reasons_for must be 'positive' or 'all', not {reasons_for!r}")
        self.reasons_for = reasons_for
        self.nthread = nthread
        self.load_error: str | None = None
        self.ref: str | int = version if version is not None else alias or "champion"
        self.loaded = self._load(self.ref)
        self.default_sticky_by = context.spec.request.id_field
        self.request_fields = tuple(context.spec.request.fields)
        self.challenger: Challenger | None = None
        self.challenger_spec: ChallengerSpec | None = None
        self.challenger_error: str | None = None
        if challenger is not None:
            # At start-up a challenger that cannot load is a spec error, as the champion is.
            spec = ChallengerSpec.model_validate(challenger)
            self.challenger = self._challenger(spec)
            self.challenger_spec = spec

    # -- lifecycle -------------------------------------------------------------

    def _load(self, ref: str | int) -> LoadedModel:
        loaded = self.registry.load(self.model_name, ref)
        meta = loaded.metadata
        if meta.task != self.task:
            raise ModelTaskError(
                f"stage {self.name!r} expects a {self.task} model (its `task` param) but "
                f"{meta.name} v{meta.version} ({self.model_name}@{ref}) is registered as "
                f"{meta.task}; set `task: {meta.task}` in the stage's params and declare the "
                f"outputs it gives ({', '.join(self._columns(meta))}), or point {ref!r} at "
                f"a {self.task} model"
            )
        loaded.booster.set_param({"nthread": self.nthread})
        return loaded

    def reconfigure(self, params: Mapping[str, Any]) -> None:
        """Swap to another alias or version, and set, change or drop the challenger
        (``params["challenger"]``: a :class:`ChallengerSpec` as a mapping, or None for
        none; absent, it stays as it is). A model that fails to load is reported and the
        current one keeps serving, the champion and the challenger each on its own."""
        ref: str | int = params.get("version") or params.get("alias") or "champion"
        self._reload(ref)
        if "challenger" in params:
            self._reload_challenger(params["challenger"])

    def _reload(self, ref: str | int) -> None:
        try:
            # The alias may have moved since it was loaded: resolve it afresh (cheap).
            target = self.registry.resolve(self.model_name, ref)
            if target.version == self.loaded.metadata.version:
                self.ref, self.load_error = ref, None
                return
            loaded = self._load(target.version)
            self._check_classes(loaded, self.loaded)
        except (RegistryError, ModelTaskError) as e:
            self.load_error = f"{self.model_name}@{ref}: {e}"
            log.error("stage %r keeps serving %s: %s", self.name, self.describe(), e)
            return
        self.loaded, self.ref, self.load_error = loaded, ref, None
        log.info("stage %r now serves %s", self.name, self.describe())

    @staticmethod
    def _check_classes(loaded: LoadedModel, current: LoadedModel) -> None:
        new, old = loaded.metadata, current.metadata
        if new.classes != old.classes:
            # The spec's outputs name the class columns: a reload must keep them.
            raise ModelTaskError(
                f"{new.name} v{new.version} has classes {new.classes} but v{old.version} has "
                f"{old.classes}; the pipeline's outputs name the classes, so change them with "
                "a new deployment, not a reload"
            )

    def _challenger(self, spec: ChallengerSpec) -> Challenger | None:
        """``spec``'s challenger loaded (None when its mode is ``off``); raises
        RegistryError or ModelTaskError (a ``sticky_by`` that names no request field too)."""
        if spec.mode == "off":
            return None
        sticky_by = spec.sticky_by or self.default_sticky_by
        if sticky_by not in self.request_fields:
            # Checked here, not on each request: a typo set at run time is refused
            # whole, and the previous setting keeps serving.
            raise ModelTaskError(
                f"the challenger's sticky_by {sticky_by!r} is not a field of the request "
                f"(they are: {', '.join(self.request_fields)})"
            )
        current = self.challenger
        target = self.registry.resolve(self.model_name, spec.ref)
        if current is not None and current.loaded.metadata.version == target.version:
            loaded = current.loaded  # the same version: a change of mode or share only
        else:
            loaded = self._load(target.version)
        self._check_classes(loaded, self.loaded)
        return Challenger(spec, loaded, sticky_by)

    def _reload_challenger(self, value: Any) -> None:
        try:
            spec = None if value is None else ChallengerSpec.model_validate(value)
            challenger = None if spec is None else self._challenger(spec)
        except (ValidationError, RegistryError, ModelTaskError) as e:
            self.challenger_error = f"challenger {value!r}: {e}"
            log.error("stage %r keeps its challenger (%s): %s", self.name, self._vs(), e)
            return
        self.challenger, self.challenger_spec, self.challenger_error = challenger, spec, None
        log.info("stage %r: %s", self.name, self._vs())

    def _vs(self) -> str:
        """``fraud v1 (champion) vs v2 in shadow``, or what the champion serves alone."""
        c = self.challenger
        if c is None:
            return f"{self.describe()} alone"
        how = f"canary {c.spec.share:.0%} by {c.sticky_by}" if c.spec.mode == CANARY else SHADOW
        return f"{self.describe()} vs v{c.loaded.metadata.version} ({how})"

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
            challenger=self.challenger_status(),
        )
        details: dict[str, Any] = {"task": meta.task}
        if meta.classes is not None:
            details["classes"] = list(meta.classes)
        return StageStatus(model=served, details=details)

    def challenger_status(self) -> dict[str, Any] | None:
        """The challenger as ``/models`` shows it: its spec, the version it loaded (none
        when ``off``) and why a reload of it failed, if one did; None without one."""
        c, spec = self.challenger, self.challenger_spec
        if spec is None and self.challenger_error is None:
            return None
        out: dict[str, Any] = spec.model_dump(exclude_none=True) if spec is not None else {}
        if c is not None:
            out |= {"model": c.loaded.metadata.name, "version": c.loaded.metadata.version}
            if c.spec.mode == CANARY:
                out["sticky_by"] = c.sticky_by
        out["load_error"] = self.challenger_error
        return out

    # -- inference -------------------------------------------------------------

    def required_columns(self) -> tuple[str, ...]:
        needed = self._inputs(self.loaded.metadata)
        c = self.challenger
        if c is not None:
            extra = self._inputs(c.loaded.metadata)
            if c.spec.mode == CANARY:
                extra += (c.sticky_by,)
            needed += tuple(x for x in extra if x not in needed)
        return needed

    @staticmethod
    def _inputs(meta: ModelMetadata) -> tuple[str, ...]:
        encoded = set(encoder_outputs(meta.encoders))
        return (*(f for f in meta.features if f not in encoded), *meta.encoders)

    def provided_columns(self) -> tuple[str, ...]:
        return self._columns(self.loaded.metadata)

    def _columns(self, meta: ModelMetadata) -> tuple[str, ...]:
        """The columns this stage adds when serving ``meta``."""
        o = self.output
        if meta.task == "binary":
            cols = [o, f"{o}_threshold"]
        elif meta.task == "multiclass":
            cols = [o, f"{o}_class", *(f"{o}_p_{c}" for c in meta.classes or ())]
        else:
            cols = [o]
        cols += [f"{o}_model", f"{o}_version"]
        if self.reasons:
            cols.append(f"{o}_reasons")
        if self.model_identity:
            cols += [MODEL_NAME, MODEL_VERSION]
        return tuple(cols)

    def features(
        self, batch: pd.DataFrame, loaded: LoadedModel | None = None
    ) -> np.ndarray[Any, Any]:
        """The model's feature matrix for ``batch``, in the order the model was trained on."""
        meta = (loaded or self.loaded).metadata
        codes = encoded(batch, meta.encoders) if meta.encoders else {}
        matrix = np.empty((len(batch), len(meta.features)), dtype=np.float32)
        # Column by column into the matrix, as pandas fills it from a frame's columns,
        # without first building that frame.
        with np.errstate(over="ignore"):  # too large for float32 is inf: process() marks it
            for j, name in enumerate(meta.features):
                column = codes.get(name)
                if column is None:
                    column = batch[name].to_numpy(dtype=np.float32, na_value=np.nan)
                matrix[:, j] = column
        return matrix

    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        loaded = self.loaded  # one version for the whole batch, even mid-reload
        challenger = self.challenger
        o = self.output
        if challenger is None:
            columns, bad, why = self._predict(batch, loaded, o, self.reasons, self.model_identity)
        elif challenger.spec.mode == SHADOW:
            # The answer is the champion's, exactly as without a challenger; the
            # challenger's scores of the same rows ride along for the log. A row only the
            # challenger cannot score (a feature of its own not finite) has no shadow score.
            columns, bad, why = self._predict(batch, loaded, o, self.reasons, self.model_identity)
            shadow, _, _ = self._predict(batch, challenger.loaded, shadow_output(o), 0, False)
            columns |= shadow
            columns[role_column(o)] = CHAMPION
            columns[mode_column(o)] = SHADOW
        else:
            picked = in_canary(batch[challenger.sticky_by], challenger.spec.share)
            columns, bad, why = self._canary(batch, loaded, challenger.loaded, picked)
            columns[role_column(o)] = np.where(picked, CHALLENGER, CHAMPION).astype(object)
            columns[mode_column(o)] = CANARY
        out = with_columns(batch, columns)
        if why is not None:
            mark_errors(out, bad, self.name, why)
        return out

    def _canary(
        self,
        batch: pd.DataFrame,
        champion: LoadedModel,
        challenger: LoadedModel,
        picked: np.ndarray[Any, np.dtype[np.bool_]],
    ) -> Predicted:
        """Each row predicted by the model its entity is routed to (``picked``: the
        challenger): each model runs once, on its own rows, and the columns interleave."""
        o, k, identity = self.output, self.reasons, self.model_identity
        if not picked.any():
            return self._predict(batch, champion, o, k, identity)
        if picked.all():
            return self._predict(batch, challenger, o, k, identity)
        rows = np.flatnonzero(picked)
        others = np.flatnonzero(~picked)
        ours = self._predict(batch.iloc[others].reset_index(drop=True), champion, o, k, identity)
        theirs = self._predict(batch.iloc[rows].reset_index(drop=True), challenger, o, k, identity)
        columns: dict[str, Any] = {}
        for name, value in ours[0].items():
            a, b = _full(value, len(others)), _full(theirs[0][name], len(rows))
            merged = np.empty(len(batch), dtype=np.result_type(a, b))
            merged[others], merged[rows] = a, b
            columns[name] = merged
        bad = np.zeros(len(batch), dtype=bool)
        bad[others], bad[rows] = ours[1], theirs[1]
        if not bad.any():
            return columns, bad, None
        why = np.full(len(batch), "", dtype=object)
        for part, reasons in ((others, ours[2]), (rows, theirs[2])):
            if reasons is not None:
                why[part] = reasons
        return columns, bad, why

    def _predict(
        self, batch: pd.DataFrame, loaded: LoadedModel, output: str, reasons: int, identity: bool
    ) -> Predicted:
        """``loaded``'s columns for ``batch`` under ``output`` (arrays or scalars), the
        rows it could not score and why (None when it scored every row)."""
        meta = loaded.metadata
        matrix = self.features(batch, loaded)
        # NaN is XGBoost's missing value, but an infinite feature (a corrupt upstream
        # value, or one too large for the model's float32) makes XGBoost refuse the whole
        # batch: such a row is marked bad and the others are scored.
        infinite = np.isinf(matrix)
        bad = infinite.any(axis=1)
        good = matrix[~bad] if bad.any() else matrix
        columns: dict[str, Any] = {}
        predicted_class: np.ndarray[Any, Any] | None = None
        explain = ~bad  # the rows that get reasons
        if meta.task == "multiclass":
            predicted_class = self._classify(columns, loaded, good, bad, output)
        else:
            scores = np.full(len(batch), np.nan)
            if len(good):
                predicted = loaded.booster.inplace_predict(good, validate_features=False)
                scores[~bad] = np.asarray(predicted, dtype=np.float64)
            columns[output] = scores
            if meta.task == "binary":
                columns[f"{output}_threshold"] = meta.threshold
                if self.reasons_for == "positive":
                    explain = explain & (scores >= meta.threshold)
        columns[f"{output}_model"] = meta.name
        columns[f"{output}_version"] = meta.version
        if identity:
            columns[MODEL_NAME] = meta.name
            columns[MODEL_VERSION] = meta.version
        if reasons:
            rows = np.flatnonzero(explain)
            top = self._top_reasons(loaded, matrix[rows], predicted_class) if len(rows) else []
            found = np.full(len(batch), None, dtype=object)  # None for a row not scored
            for i in np.flatnonzero(~bad & ~explain):
                found[i] = []  # scored, not explained
            for i, row in zip(rows, top, strict=True):
                found[i] = row
            columns[f"{output}_reasons"] = found
        if not bad.any():
            return columns, bad, None  # the common case: nothing to explain, nothing built
        why = np.full(len(batch), "", dtype=object)
        names = np.array(meta.features, dtype=object)
        for i in np.flatnonzero(bad):
            why[i] = f"{', '.join(names[infinite[i]])}: not a finite number"
        return columns, bad, why

    def _classify(
        self,
        columns: dict[str, Any],
        loaded: LoadedModel,
        good: np.ndarray[Any, Any],
        bad: np.ndarray[Any, np.dtype[np.bool_]],
        o: str,
    ) -> np.ndarray[Any, Any]:
        """Put a multiclass model's columns in ``columns``; the predicted class of each
        good row."""
        classes = np.array(loaded.metadata.classes, dtype=object)
        probs = np.full((len(bad), len(classes)), np.nan)
        best = np.zeros(len(good), dtype=np.intp)
        if len(good):
            # Softmax of the margins, in float64: probabilities from multi:softprob and
            # multi:softmax models alike (the latter predicts only a class index).
            margin = loaded.booster.inplace_predict(
                good, validate_features=False, predict_type="margin"
            )
            margin = np.asarray(margin, dtype=np.float64).reshape(len(good), len(classes))
            exp = np.exp(margin - margin.max(axis=1, keepdims=True))
            probs[~bad] = exp / exp.sum(axis=1, keepdims=True)
            best = probs[~bad].argmax(axis=1)
        names = np.full(len(bad), None, dtype=object)
        names[~bad] = classes[best]
        top = np.full(len(bad), np.nan)
        top[~bad] = probs[~bad][np.arange(len(good)), best]
        columns[o] = top
        columns[f"{o}_class"] = names
        for i, name in enumerate(classes):
            columns[f"{o}_p_{name}"] = probs[:, i]
        return best

    def _top_reasons(
        self,
        loaded: LoadedModel,
        matrix: np.ndarray[Any, Any],
        predicted_class: np.ndarray[Any, Any] | None = None,
    ) -> list[list[str]]:
        names = np.array(loaded.metadata.features, dtype=object)
        dmatrix = xgb.DMatrix(matrix, feature_names=list(names), nthread=self.nthread)
        contribs = loaded.booster.predict(
            dmatrix, pred_contribs=True, approx_contribs=self.approx_reasons
        )
        if predicted_class is not None:  # (rows, classes, features): the predicted class's
            contribs = contribs[np.arange(len(matrix)), predicted_class]
        contribs = contribs[:, :-1]  # the last column is the bias
        k = min(self.reasons, contribs.shape[1])
        top = np.argsort(-contribs, axis=1, kind="stable")[:, :k]
        return [list(row) for row in names[top]]


def _check_alone(context: StageContext, output: str, model_identity: bool) -> None:
    """Refuse a second model stage of the spec writing the same columns as an earlier
    one (its ``output``; ``model_name`` with ``model_identity``): the later would
    overwrite the earlier's scores on every row, silently."""
    spec = context.spec
    names = [s.name for s in spec.stages]
    if context.stage_name not in names:  # built outside a spec's chain: nothing to clash
        return
    for stage in spec.stages[: names.index(context.stage_name)]:
        if not issubclass(resolve_class(stage.uses, spec.base_dir), XGBoostPredictor):
            continue
        if (stage.params.get("output") or "score") == output:
            raise StageError(
                f"stage {context.stage_name!r} would write the columns of model stage "
                f"{stage.name!r} ({output!r}, {output}_model...): give each model stage an "
                f"output of its own (params: {{output: {output}_2}}), as an ensemble does"
            )
        if model_identity and stage.params.get("model_identity"):
            raise StageError(
                f"stages {stage.name!r} and {context.stage_name!r} both set model_identity: "
                "only one model stage can say which model answers; an ensemble's Combine "
                "stage says it (its first input's model)"
            )


def _full(value: Any, n: int) -> np.ndarray[Any, Any]:
    """A column value (an array, or one scalar for every row) as an array of ``n``."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, str):
        return np.full(n, value, dtype=object)
    return np.full(n, value)
