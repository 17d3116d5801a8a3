"""What the prediction log says about a model: ``stageline monitor`` and ``stageline evaluate``.

:func:`drift` compares the features and scores logged since a time with the training
profile of the model version that scored them (:func:`stageline.training.profile`): the
population stability index of each feature and of the score, on the training deciles,
and the shift of the score's mean. :func:`evaluate` joins labels that arrived later to
the logged predictions by the record's id, and scores each model version per day;
:func:`compare` puts a champion and its challenger side by side.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import pandas as pd

from stageline.challenger import (
    CANARY,
    CHALLENGER,
    CHAMPION,
    SHADOW,
    predictions_by_role,
    shadow_output,
)
from stageline.predlog import TIME_COLUMN, log_location, read_log
from stageline.registry import ModelMetadata, open_registry
from stageline.spec import PipelineSpec, SpecError
from stageline.stages.transform import apply_encoders
from stageline.storage import StorageLocations
from stageline.training import labels, log_loss, model_stage, psi, rmse, roc_auc, shares

SHIFT = 0.1
"""A PSI from here is a shift worth watching."""
DRIFT = 0.25
"""A PSI from here is a drift: the model sees data unlike what it learned from."""

Status = Literal["stable", "shift", "drift"]


def status(value: float) -> Status:
    return "drift" if value >= DRIFT else "shift" if value >= SHIFT else "stable"


@dataclass(frozen=True)
class Drift:
    """One feature (or the score) live against its training profile."""

    name: str
    psi: float
    edges: list[float]
    trained: list[float]
    """Training shares of the bins (below the first edge, between each two, above)."""
    live: list[float]
    trained_missing: float
    live_missing: float
    trained_mean: float | None
    live_mean: float | None

    @property
    def status(self) -> Status:
        return status(self.psi)


@dataclass(frozen=True)
class DriftReport:
    """The drift of one model version's features and score over the logged rows."""

    model: str
    version: int
    rows: int
    first: datetime
    last: datetime
    features: list[Drift]
    score: Drift

    def flagged(self) -> list[Drift]:
        """The features and the score that drifted (PSI at or over :data:`DRIFT`)."""
        return [d for d in [*self.features, self.score] if d.status == "drift"]

    def table(self) -> str:
        head = (
            f"{self.model} v{self.version}: {self.rows} predictions logged "
            f"{self.first:%Y-%m-%d %H:%M} to {self.last:%Y-%m-%d %H:%M} UTC, against its "
            "training profile"
        )
        rows = [["FEATURE", "PSI", "STATUS", "MEAN (TRAINED -> LIVE)", "MISSING"]]
        ordered = sorted(self.features, key=lambda d: -d.psi)
        for d in [self.score, *ordered]:
            name = _label(d.name, score=d is self.score)
            rows.append([
                name,
                f"{d.psi:.3f}",
                d.status.upper() if d.status != "stable" else d.status,
                f"{_num(d.trained_mean)} -> {_num(d.live_mean)}",
                f"{d.trained_missing:.0%} -> {d.live_missing:.0%}",
            ])  # fmt: skip
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        flagged = self.flagged()
        verdict = (
            f"drift (PSI >= {DRIFT}) in: {', '.join(d.name for d in flagged)}"
            if flagged
            else f"no drift (every PSI under {DRIFT})"
        )
        return "\n".join([head, *lines, verdict])


def _label(name: str, *, score: bool) -> str:
    return f"{name} (the score)" if score and name != "score" else name


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``1d``, ``12h``, ``30m`` (that long before ``now``) or an ISO 8601 time (UTC if it
    has no zone)."""
    now = now or datetime.now(timezone.utc)
    units = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}
    text = text.strip()
    if text[:-1].replace(".", "", 1).isdigit() and text[-1:] in units:
        return now - timedelta(**{units[text[-1]]: float(text[:-1])})
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise SpecError(
            f"--since {text!r}: give a duration (1d, 12h, 30m) or a time (2026-12-01T00:00)"
        ) from None
    return at if at.tzinfo is not None else at.replace(tzinfo=timezone.utc)


def logged(spec: PipelineSpec, home: Path, since: datetime | None) -> pd.DataFrame:
    """The pipeline's prediction log from ``since``; a SpecError naming where it looked
    when nothing is there."""
    where = log_location(home, spec.name, spec.prediction_log)
    frame = read_log(where, since)
    if frame.empty:
        after = f" since {since:%Y-%m-%d %H:%M} UTC" if since is not None else ""
        raise SpecError(f"no predictions logged under {where}{after}: serve some first")
    return frame


def _model_columns(spec: PipelineSpec) -> tuple[str, str, str]:
    """The model's name, its score column and its version column in logged rows."""
    stage = model_stage(spec)
    output = str(stage.params.get("output") or "score")
    return str(stage.params["model"]), output, f"{output}_version"


def drift(
    spec: PipelineSpec, home: Path, since: datetime | None = None, frame: pd.DataFrame | None = None
) -> list[DriftReport]:
    """One report per model version in the log since ``since`` (or in ``frame``)."""
    frame = logged(spec, home, since) if frame is None else frame
    name, output, version_column = _model_columns(spec)
    registry = open_registry(StorageLocations.resolve(spec, home).models)
    scored = frame[frame[version_column].notna()] if version_column in frame else frame.iloc[:0]
    if scored.empty:
        raise SpecError(f"no logged row carries a {name} version ({version_column})")
    reports = []
    for version, rows in scored.groupby(version_column, sort=True):
        meta = registry.resolve(name, int(cast(float, version)))
        reports.append(version_drift(meta, rows, output))
    return reports


def version_drift(meta: ModelMetadata, rows: pd.DataFrame, output: str) -> DriftReport:
    """``rows`` (scored by ``meta``'s version) against ``meta``'s training profile."""
    profile = meta.profile
    if not profile:
        raise SpecError(
            f"{meta.name} v{meta.version} has no training profile to compare with: it was "
            "registered without one (train it with stageline train)"
        )
    # The model's own inputs: encoded categories are computed inside the model stage.
    inputs = apply_encoders(rows, meta.encoders) if meta.encoders else rows
    features = [_drift(f, hist, inputs.get(f)) for f, hist in profile["features"].items()]
    times = pd.to_datetime(rows[TIME_COLUMN], utc=True)
    return DriftReport(
        meta.name,
        meta.version,
        len(rows),
        times.min().to_pydatetime(),
        times.max().to_pydatetime(),
        features,
        _drift(output, profile["score"], rows[output]),
    )


def _drift(name: str, hist: dict[str, Any], column: pd.Series | None) -> Drift:
    values = (
        np.full(1, np.nan)
        if column is None
        else pd.to_numeric(column, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
    )
    present = values[~np.isnan(values)]
    live = shares(present, hist["edges"]) if len(present) else np.zeros(len(hist["shares"]))
    return Drift(
        name=name,
        psi=psi(hist["shares"], live),
        edges=list(hist["edges"]),
        trained=list(hist["shares"]),
        live=[float(x) for x in live],
        trained_missing=float(hist["missing"]),
        live_missing=float(1 - len(present) / len(values)),
        trained_mean=hist.get("mean"),
        live_mean=float(present.mean()) if len(present) else None,
    )


class DriftMeter:
    """The drift of what a serving replica logs, kept as it goes: per model version, the
    rows in each training bin of each feature and of the score, and their PSI against
    the version's profile (what ``stageline monitor`` computes from the whole log).

    :meth:`observe` takes each batch the prediction log writes (on its writer thread,
    never on a request's path). Counts are halved once a version has seen
    ``window_rows``: the figures follow the recent traffic, not all since the start."""

    def __init__(self, spec: PipelineSpec, home: Path, window_rows: int = 50_000) -> None:
        self.registry = open_registry(StorageLocations.resolve(spec, home).models)
        self.name, self.output, self.version_column = _model_columns(spec)
        self.window_rows = window_rows
        self._profiles: dict[int, ModelMetadata | None] = {}
        self._counts: dict[int, dict[str, np.ndarray[Any, Any]]] = {}
        self._rows: dict[int, float] = {}

    def observe(self, frame: pd.DataFrame) -> dict[tuple[int, str], float]:
        """Count ``frame``'s rows (logged rows); the PSI of every feature (and of the
        score, under the output's name) of each version seen so far."""
        if self.version_column in frame.columns:
            versions = pd.to_numeric(frame[self.version_column], errors="coerce")
            for version in versions.dropna().unique():
                rows = frame[(versions == version).to_numpy()]
                self._count(int(version), rows)
        return self.figures()

    def _count(self, version: int, rows: pd.DataFrame) -> None:
        if version not in self._profiles:
            try:
                meta: ModelMetadata | None = self.registry.resolve(self.name, version)
            except Exception:  # a registry that cannot say: no figures, never a failure
                meta = None
            self._profiles[version] = meta if meta is not None and meta.profile else None
        meta = self._profiles[version]
        if meta is None:
            return
        inputs = apply_encoders(rows, meta.encoders) if meta.encoders else rows
        counts = self._counts.setdefault(version, {})
        histograms = {**meta.profile["features"], self.output: meta.profile["score"]}
        for name, hist in histograms.items():
            column = rows.get(name) if name == self.output else inputs.get(name)
            if column is None:
                continue
            values = pd.to_numeric(column, errors="coerce").to_numpy(
                dtype="float64", na_value=np.nan
            )
            values = values[~np.isnan(values)]
            bins = np.searchsorted(np.asarray(hist["edges"]), values, side="right")
            now = np.bincount(bins, minlength=len(hist["shares"])).astype("float64")
            counts[name] = counts.get(name, np.zeros_like(now)) + now
        self._rows[version] = self._rows.get(version, 0.0) + len(rows)
        if self._rows[version] >= self.window_rows:
            self._rows[version] /= 2
            for name in counts:
                counts[name] /= 2

    def figures(self) -> dict[tuple[int, str], float]:
        out = {}
        for version, counts in self._counts.items():
            meta = self._profiles[version]
            assert meta is not None
            histograms = {**meta.profile["features"], self.output: meta.profile["score"]}
            for name, seen in counts.items():
                if seen.sum() > 0:
                    out[(version, name)] = psi(histograms[name]["shares"], seen / seen.sum())
        return out


# --------------------------------------------------------------------------- the HTML report


def html_report(spec: PipelineSpec, reports: list[DriftReport]) -> str:
    """One page: per model version, the verdict, then each feature's training and live
    shares per bin side by side, the drifted first."""
    sections = []
    for report in reports:
        flagged = report.flagged()
        verdict = (
            f'<p class="bad">Drift in {", ".join(html.escape(d.name) for d in flagged)}.</p>'
            if flagged
            else f'<p class="ok">No drift: every PSI under {DRIFT}.</p>'
        )
        cards = "".join(
            _card(d, score=d is report.score)
            for d in [report.score, *sorted(report.features, key=lambda d: -d.psi)]
        )
        sections.append(
            f"<h2>{html.escape(report.model)} v{report.version}</h2>"
            f"<p>{report.rows:,} predictions logged {report.first:%Y-%m-%d %H:%M} to "
            f"{report.last:%Y-%m-%d %H:%M} UTC, against the training profile.</p>"
            f'{verdict}<div class="cards">{cards}</div>'
        )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(spec.name)}: drift</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 2em; color: #222; }}
.cards {{ display: flex; flex-wrap: wrap; gap: 1em; }}
.card {{ border: 1px solid #ddd; border-radius: 6px; padding: .6em .8em; width: 330px; }}
.card h3 {{ font-size: 14px; margin: 0 0 .3em; }}
.stable {{ color: #2a7a2a; }} .shift {{ color: #b07800; }} .drift {{ color: #c0392b; }}
.ok {{ color: #2a7a2a; }} .bad {{ color: #c0392b; font-weight: bold; }}
.legend span {{ display: inline-block; width: 10px; height: 10px; margin: 0 4px 0 10px; }}
small {{ color: #666; }}
</style></head><body>
<h1>{html.escape(spec.name)}: live predictions against training</h1>
<p class="legend">Share of rows per bin (the training deciles):
<span style="background:#9db4d0"></span>training <span style="background:#e07b39"></span>live.
PSI under {SHIFT} stable, {SHIFT} to {DRIFT} a shift, {DRIFT} and over a drift.</p>
{"".join(sections)}
</body></html>
"""


def _card(d: Drift, *, score: bool) -> str:
    width, height, pad = 310, 120, 16
    bins = len(d.trained)
    top = max([*d.trained, *d.live, 1e-9])
    step = (width - 2) / max(bins, 1)
    bars = []
    for i, (t, v) in enumerate(zip(d.trained, d.live, strict=True)):
        x = 1 + i * step
        for j, (share, colour) in enumerate(((t, "#9db4d0"), (v, "#e07b39"))):
            h = (height - pad) * share / top
            bars.append(
                f'<rect x="{x + j * step * 0.45 + step * 0.05:.1f}" y="{height - pad - h:.1f}" '
                f'width="{step * 0.42:.1f}" height="{h:.1f}" fill="{colour}">'
                f"<title>{'training' if j == 0 else 'live'}: {share:.1%}</title></rect>"
            )
    low = f"{d.edges[0]:.3g}" if d.edges else ""
    high = f"{d.edges[-1]:.3g}" if d.edges else ""
    axis = (
        f'<text x="1" y="{height - 2}" font-size="10">&lt; {low}</text>'
        f'<text x="{width - 1}" y="{height - 2}" font-size="10" text-anchor="end">'
        f"&gt;= {high}</text>"
    )
    title = html.escape(_label(d.name, score=score))
    return (
        f'<div class="card"><h3>{title} <span class="{d.status}">PSI {d.psi:.3f} '
        f"{d.status}</span></h3>"
        f'<svg width="{width}" height="{height}" role="img">{"".join(bars)}{axis}</svg>'
        f"<br><small>mean {_num(d.trained_mean)} &rarr; {_num(d.live_mean)}; missing "
        f"{d.trained_missing:.0%} &rarr; {d.live_missing:.0%}</small></div>"
    )


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class Labelled:
    """Logged predictions joined with their labels: one row per model that scored a
    record (:func:`~stageline.challenger.predictions_by_role`), the last of each."""

    model: str
    rows: pd.DataFrame
    """``role``, ``mode``, ``version``, ``prediction``, ``label``, ``day`` and the id."""
    shadow: pd.DataFrame
    """Shadow-scored records: ``champion``, ``challenger`` (versions), their
    ``champion_score`` and ``challenger_score``, ``label``."""
    binary: bool


def labelled(
    spec: PipelineSpec,
    home: Path,
    truth: pd.DataFrame,
    *,
    label: str | None = None,
    since: datetime | None = None,
    frame: pd.DataFrame | None = None,
) -> Labelled:
    """The logged predictions that have a label (the request's ``id_field`` joined with
    ``truth``; ``label``: its column, default ``training.label``)."""
    frame = logged(spec, home, since) if frame is None else frame
    name, output, version_column = _model_columns(spec)
    id_field = spec.request.id_field
    label = label or (spec.training.label if spec.training else None)
    if label is None:
        raise SpecError("name the labels' column (--label), or set training.label in the spec")
    for column in (id_field, label):
        if column not in truth.columns:
            raise SpecError(f"the labels have no column {column!r}")
    binary = (model_stage(spec).params.get("task") or "binary") == "binary"
    truth = truth[[id_field, label]].drop_duplicates(id_field, keep="last")
    truth = truth.rename(columns={label: "label"})
    frame = frame.sort_values(TIME_COLUMN, kind="stable")
    frame = frame.assign(day=pd.to_datetime(frame[TIME_COLUMN], utc=True).dt.strftime("%Y-%m-%d"))
    by_role = predictions_by_role(frame.drop(columns=["label"], errors="ignore"), output)
    by_role = by_role[by_role["prediction"].notna()]
    rows = by_role.drop_duplicates([id_field, "version", "role"], keep="last").merge(
        truth, on=id_field, how="inner"
    )
    if rows.empty:
        raise SpecError(f"no logged prediction of {name} has a label (joined on {id_field!r})")
    rows["label"] = labels(rows["label"], binary)
    shadow = shadow_output(output)
    pairs = pd.DataFrame(
        columns=["champion", "challenger", "champion_score", "challenger_score", "label"]
    )
    if f"{shadow}_version" in frame.columns:
        scored = frame[frame[f"{shadow}_version"].notna() & frame[output].notna()]
        scored = scored[scored[shadow].notna()]
        scored = scored.drop_duplicates(
            [id_field, version_column, f"{shadow}_version"], keep="last"
        )
        pairs = pd.DataFrame({
            id_field: scored[id_field],
            "champion": scored[version_column],
            "challenger": scored[f"{shadow}_version"],
            "champion_score": scored[output],
            "challenger_score": scored[shadow],
        }).merge(truth, on=id_field, how="inner")  # fmt: skip
        pairs["label"] = labels(pairs["label"], binary) if len(pairs) else pairs["label"]
    return Labelled(name, rows, pairs, binary)


def _metrics(
    y: np.ndarray[Any, Any], scores: np.ndarray[Any, Any], binary: bool
) -> dict[str, float]:
    if binary:
        return {
            "auc": roc_auc(y, scores),
            "logloss": log_loss(y, scores),
            "positive_rate": float(y.mean()),
            "mean_score": float(scores.mean()),
        }
    return {"mae": float(np.abs(scores - y).mean()), "rmse": rmse(y, scores)}


def evaluate(
    spec: PipelineSpec,
    home: Path,
    truth: pd.DataFrame,
    *,
    label: str | None = None,
    since: datetime | None = None,
    frame: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Logged predictions joined with labels that arrived later, by the record's id
    (the request's ``id_field``; the last prediction of an id per model version and
    role), scored per model version, role and day: ``n`` and AUC, log loss and the
    positive rate for a binary model, MAE and RMSE for a regression one. ``role`` is
    ``champion`` or ``challenger`` and ``mode`` ``shadow``, ``canary`` or None (no
    challenger): a shadow challenger's rows are its own predictions of the records the
    champion answered. ``label``: the labels' column (default: ``training.label``)."""
    return scores(labelled(spec, home, truth, label=label, since=since, frame=frame))


def scores(found: Labelled) -> pd.DataFrame:
    """:func:`evaluate`'s table from predictions already joined with their labels."""
    joined = found.rows.assign(mode=found.rows["mode"].fillna(""))
    rows = []
    keys = ["version", "role", "mode", "day"]
    for (version, role, mode, day), part in joined.groupby(keys, sort=True):
        y = part["label"].to_numpy(dtype="float64")
        row: dict[str, Any] = {
            "model": found.model,
            "version": int(cast(float, version)),
            "role": role,
            "mode": mode or None,
            "day": day,
            "n": len(part),
        }
        rows.append(row | _metrics(y, part["prediction"].to_numpy(dtype="float64"), found.binary))
    # Champions first, then their challengers, each by version and day.
    table = pd.DataFrame(rows)
    order = table["role"].map({CHAMPION: 0, CHALLENGER: 1})
    return table.assign(_o=order).sort_values(["_o", "version", "day"]).drop(columns="_o")


@dataclass(frozen=True)
class Comparison:
    """Champion and challenger side by side on labelled records: in ``shadow`` mode the
    same records (both scored each), in ``canary`` mode each on its own traffic."""

    model: str
    mode: str
    champion: int
    challenger: int
    n_champion: int
    n_challenger: int
    champion_metrics: dict[str, float]
    challenger_metrics: dict[str, float]

    def record(self) -> dict[str, Any]:
        return {
            "comparison": self.mode,
            "model": self.model,
            "champion": {"version": self.champion, "n": self.n_champion} | self.champion_metrics,
            "challenger": {"version": self.challenger, "n": self.n_challenger}
            | self.challenger_metrics,
        }

    def table(self) -> str:
        if self.mode == SHADOW:
            head = (
                f"shadow: {self.model} v{self.champion} (champion, answered) and "
                f"v{self.challenger} (challenger, logged) on the same {self.n_champion} "
                "labelled records"
            )
        else:
            head = (
                f"canary: {self.model} v{self.champion} (champion) on its {self.n_champion} "
                f"labelled records, v{self.challenger} (challenger) on its "
                f"{self.n_challenger}"
            )
        rows = [["METRIC", f"CHAMPION v{self.champion}", f"CHALLENGER v{self.challenger}", "DIFF"]]
        for metric, ours in self.champion_metrics.items():
            theirs = self.challenger_metrics[metric]
            rows.append([metric, f"{ours:.4f}", f"{theirs:.4f}", f"{theirs - ours:+.4f}"])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
        ]
        return "\n".join([head, *lines])


def compare(found: Labelled) -> list[Comparison]:
    """Each champion and challenger pair in the labelled log, side by side: shadow pairs
    on the records both scored, canary pairs each on the records it answered."""
    out = []
    shadow = found.shadow
    for (champion, challenger), part in shadow.groupby(["champion", "challenger"], sort=True):
        pair = (champion, part, "champion_score"), (challenger, part, "challenger_score")
        out.append(_comparison(found, SHADOW, *pair))
    canary = found.rows[found.rows["mode"] == CANARY]
    ours = canary[canary["role"] == CHAMPION].groupby("version", sort=True)
    theirs = canary[canary["role"] == CHALLENGER].groupby("version", sort=True)
    for champion, a in ours:
        for challenger, b in theirs:
            out.append(
                _comparison(
                    found, CANARY, (champion, a, "prediction"), (challenger, b, "prediction")
                )
            )
    return out


def _comparison(
    found: Labelled,
    mode: str,
    champion: tuple[Any, pd.DataFrame, str],
    challenger: tuple[Any, pd.DataFrame, str],
) -> Comparison:
    """The pair's metrics, each (version, its labelled rows, its score column)."""
    (v1, a, score_a), (v2, b, score_b) = champion, challenger
    return Comparison(
        found.model,
        mode,
        int(cast(float, v1)),
        int(cast(float, v2)),
        len(a),
        len(b),
        _metrics(
            a["label"].to_numpy(dtype="float64"), a[score_a].to_numpy(dtype="float64"), found.binary
        ),
        _metrics(
            b["label"].to_numpy(dtype="float64"), b[score_b].to_numpy(dtype="float64"), found.binary
        ),
    )
