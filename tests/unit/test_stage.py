"""The stage contract as a user meets it through a pipeline: column checks that name the
stage, bad rows passed through untouched, one row out per row in, and results that do not
depend on how rows are batched."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from stageline import BaseStage, Pipeline, StageError, check_columns, mark_errors
from stageline.context import StageContext
from stageline.stage import MissingColumnsError
from tests.conftest import FRAUD_SPEC

# ----------------------------------------------------------------- stages the specs below use


class NeedsColumn(BaseStage):
    """Requires a column that no stage provides."""

    requires = ("loyalty_tier",)

    def __init__(self, *, context: StageContext) -> None:
        super().__init__(name=context.stage_name)

    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        return batch


class PlainNeedsColumn:
    """The same, as a plain class that uses the shared check."""

    def __init__(self, *, context: StageContext) -> None:
        self.name = context.stage_name

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        check_columns(self.name, batch, ["loyalty_tier", "amount"])
        return batch


class AmountGate(BaseStage):
    """Marks rows whose amount is above a limit."""

    def __init__(self, *, above: float, context: StageContext) -> None:
        super().__init__(name=context.stage_name)
        self.above = above

    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        out = batch.copy()
        return mark_errors(out, out["amount"] > self.above, self.name, f"amount above {self.above}")


class Rewrite(BaseStage):
    """Changes an existing column and adds one: what a bad row must never see."""

    provides = ("stamp",)

    def __init__(self, *, context: StageContext) -> None:
        super().__init__(name=context.stage_name)

    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        out = batch.copy()
        out["customer_id"] = "rewritten"
        out["stamp"] = 1.0
        return out


class DropsLastRow(BaseStage):
    def __init__(self, *, context: StageContext) -> None:
        super().__init__(name=context.stage_name)

    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        return batch.iloc[:-1]


class PlainDropsLastRow:
    def __init__(self, **params: Any) -> None:
        pass

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return batch.iloc[:-1]


def _fraud_with(tmp_path: Path, extra: dict[int, dict[str, Any]]) -> Path:
    """fraud.yaml with a stage inserted before each given position."""
    data = yaml.safe_load(FRAUD_SPEC.read_text())
    for position in sorted(extra, reverse=True):
        data["stages"].insert(position, extra[position])
    data["serve"]["graph"]["fuse"] = []  # the groups it names may no longer be adjacent
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _stage(name: str, cls: str, **params: Any) -> dict[str, Any]:
    return {"name": name, "uses": f"{__name__}:{cls}", "params": params}


def _batch(good_record: dict[str, object], amounts: list[float]) -> pd.DataFrame:
    return pd.DataFrame(
        [{**good_record, "transaction_id": f"t-{i}", "amount": a} for i, a in enumerate(amounts)]
    )


# --------------------------------------------------------------------------- column checks


@pytest.mark.parametrize("cls", ["NeedsColumn", "PlainNeedsColumn"])
def test_missing_column_error_names_the_stage_and_the_columns(
    tmp_path: Path, demo_home: Path, good_record: dict[str, object], cls: str
) -> None:
    path = _fraud_with(tmp_path, {2: _stage("loyalty", cls)})
    pipe = Pipeline.from_spec(path, home=demo_home)

    with pytest.raises(MissingColumnsError) as caught:
        pipe(pd.DataFrame([good_record]))

    assert isinstance(caught.value, StageError)
    assert caught.value.stage == "loyalty"
    assert caught.value.missing == ["loyalty_tier"]
    message = str(caught.value)
    assert "stage 'loyalty'" in message
    assert "'loyalty_tier'" in message
    assert "earlier stage" in message  # tells the user where to look


# --------------------------------------------------------------------------- pass-through


def test_rows_marked_early_pass_through_later_stages_untouched(
    tmp_path: Path, demo_home: Path, good_record: dict[str, object]
) -> None:
    path = _fraud_with(
        tmp_path,
        {
            1: _stage("big", "AmountGate", above=1000),
            2: _stage("medium", "AmountGate", above=100),
            3: _stage("rewrite", "Rewrite"),
        },
    )
    pipe = Pipeline.from_spec(path, home=demo_home)
    batch = _batch(good_record, [50.0, 5000.0, 500.0, 60.0, 9000.0])

    frame = pipe(batch)
    predicted = pipe.predict(batch)

    big, medium, good = [1, 4], [2], [0, 3]
    assert frame.loc[big, "_error"].tolist() == ["big: amount above 1000"] * 2  # first reason kept
    assert frame.loc[medium, "_error"].tolist() == ["medium: amount above 100"]
    assert frame.loc[good, "_error"].isna().all()

    marked = big + medium
    for column in ("transaction_id", "customer_id", "amount", "merchant_category", "country"):
        assert frame.loc[marked, column].tolist() == batch.loc[marked, column].tolist(), column
    assert frame.loc[marked, "stamp"].isna().all()
    assert predicted.loc[marked, "score"].isna().all()
    assert predicted.loc[marked, "label"].isna().all()
    # Stages between the two gates ran for rows still good at the time, never after.
    assert frame.loc[big, "amount_to_avg"].isna().all()

    assert (frame.loc[good, "customer_id"] == "rewritten").all()
    assert (frame.loc[good, "stamp"] == 1.0).all()
    assert predicted.loc[good, "score"].between(0, 1).all()


@pytest.mark.parametrize("cls", ["DropsLastRow", "PlainDropsLastRow"])
def test_stage_returning_wrong_number_of_rows_is_an_error_naming_it(
    tmp_path: Path, demo_home: Path, good_record: dict[str, object], cls: str
) -> None:
    pipe = Pipeline.from_spec(_fraud_with(tmp_path, {2: _stage("shrink", cls)}), home=demo_home)
    with pytest.raises(StageError, match=r"stage 'shrink' returned 2 rows for 3"):
        pipe(_batch(good_record, [1.0, 2.0, 3.0]))


# --------------------------------------------------------------------------- index and batching


class _Double(BaseStage):
    provides = ("double",)

    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        out = batch.copy()
        out["double"] = out["amount"] * 2
        return out


@pytest.mark.parametrize("with_bad_row", [False, True])
def test_stage_keeps_the_batch_index(with_bad_row: bool) -> None:
    batch = pd.DataFrame({"amount": [1.0, 2.0, 3.0]}, index=[30, 10, 20])
    if with_bad_row:
        mark_errors(batch, np.array([False, True, False]), "earlier", "bad")

    out = _Double()(batch)

    assert out.index.tolist() == [30, 10, 20]
    assert out["amount"].tolist() == [1.0, 2.0, 3.0]
    expected = [2.0, np.nan, 6.0] if with_bad_row else [2.0, 4.0, 6.0]
    np.testing.assert_array_equal(out["double"].to_numpy(dtype=float), expected)


def test_pipeline_keeps_the_callers_index(
    fraud_pipeline: Pipeline, good_record: dict[str, object]
) -> None:
    batch = _batch(good_record, [10.0, 20.0, -1.0])
    batch.index = pd.Index([7, 3, 9])
    predicted = fraud_pipeline.predict(batch)
    assert predicted.index.tolist() == [7, 3, 9]
    # So the caller can line predictions up with the rows it sent.
    joined = batch.join(predicted[["score", "error"]])
    assert str(joined.loc[9, "error"]).startswith("validate: amount:")
    assert joined.loc[[7, 3], "score"].notna().all()


def test_batch_size_does_not_change_results(
    fraud_pipeline: Pipeline, holdout: pd.DataFrame
) -> None:
    request = list(fraud_pipeline.spec.request.fields)
    rows = holdout[request].sample(5000, replace=True, random_state=0).reset_index(drop=True)

    whole = fraud_pipeline.predict(rows)
    assert whole["error"].isna().all()

    # Online: one row at a time, for a spread of rows.
    picks = np.linspace(0, len(rows) - 1, 25).astype(int)
    one_by_one = pd.concat(
        [fraud_pipeline.predict(rows.iloc[[i]]) for i in picks], ignore_index=True
    )
    # Batch: uneven chunks, as Serve's dynamic batching and Ray Data's blocks cut them.
    bounds = [0, 1, 4, 68, 1000, 3071, 5000]
    chunked = pd.concat(
        [fraud_pipeline.predict(rows.iloc[a:b]) for a, b in itertools.pairwise(bounds)],
        ignore_index=True,
    )

    for part, index in ((one_by_one, picks), (chunked, np.arange(len(rows)))):
        expected = whole.iloc[index].reset_index(drop=True)
        assert np.array_equal(part["score"].to_numpy(), expected["score"].to_numpy())
        assert part["label"].tolist() == expected["label"].tolist()
        assert part["reasons"].tolist() == expected["reasons"].tolist()
        assert part["transaction_id"].tolist() == expected["transaction_id"].tolist()


class Enrich(BaseStage):
    """Adds columns of every kind and rewrites two it was given."""

    provides = ("n", "flag", "seen_at", "note", "amount", "ts")

    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        out = batch.copy()
        out["n"] = np.arange(len(out), dtype="int64") + 10
        out["flag"] = out["amount"] > 100
        out["seen_at"] = pd.Timestamp("2026-01-02", tz="UTC")
        out["note"] = "ok"
        out["amount"] = out["amount"] * 2
        out["ts"] = out["ts"] + pd.Timedelta(hours=1)
        return out


def test_stage_output_is_merged_back_around_bad_rows_for_every_dtype() -> None:
    ts = pd.date_range("2026-01-01", periods=4, freq="h", tz="UTC")
    batch = pd.DataFrame(
        {
            "amount": [50.0, 500.0, 5.0, 700.0],
            "ts": ts,
            "_error": pd.Series(
                [None, "validate: amount: bad", None, "features: down"], dtype=object
            ).to_numpy(),
        },
        index=[7, 3, 9, 1],
    )

    out = Enrich(name="enrich")(batch)

    good, bad = [7, 9], [3, 1]
    assert out.index.tolist() == [7, 3, 9, 1]
    assert out.loc[good, "amount"].tolist() == [100.0, 10.0]
    assert out.loc[bad, "amount"].tolist() == [500.0, 700.0]  # untouched
    assert out["ts"].dtype == batch["ts"].dtype
    assert out.loc[good, "ts"].tolist() == [
        ts[0] + pd.Timedelta(hours=1),
        ts[2] + pd.Timedelta(hours=1),
    ]
    assert out.loc[bad, "ts"].tolist() == [ts[1], ts[3]]
    assert out.loc[good, "n"].tolist() == [10.0, 11.0]
    assert out.loc[bad, "n"].isna().all()
    assert out.loc[good, "flag"].tolist() == [False, False]
    assert out.loc[bad, "flag"].isna().all()
    assert out.loc[good, "seen_at"].tolist() == [pd.Timestamp("2026-01-02", tz="UTC")] * 2
    assert out.loc[bad, "seen_at"].isna().all()
    assert out.loc[good, "note"].tolist() == ["ok", "ok"]
    assert out.loc[bad, "note"].isna().all()
    assert out["_error"].tolist() == [None, "validate: amount: bad", None, "features: down"]


def test_reasons_explain_positive_labels_and_every_row_when_asked(
    fraud_pipeline: Pipeline, holdout: pd.DataFrame, demo_home: Path
) -> None:
    """The shipped model stage explains the rows it labels positive (adverse-action
    codes); ``reasons_for: all`` explains every row, and the scores are the same."""
    rows = holdout[list(fraud_pipeline.spec.request.fields)].head(3000)
    by_default = fraud_pipeline.predict(rows)
    labels = by_default["label"].astype(bool).to_numpy()
    assert 0 < labels.sum() < len(labels)
    assert all(len(r) == 3 for r in by_default["reasons"][labels])
    assert all(r == [] for r in by_default["reasons"][~labels])

    data = fraud_pipeline.spec.model_dump(mode="json", exclude_unset=True)
    model = next(s for s in data["stages"] if s["name"] == "model")
    model["params"]["reasons_for"] = "all"
    every_row = Pipeline(type(fraud_pipeline.spec).model_validate(data), demo_home).predict(rows)

    assert np.array_equal(every_row["score"].to_numpy(), by_default["score"].to_numpy())
    assert all(len(r) == 3 for r in every_row["reasons"])
    assert every_row["reasons"][labels].tolist() == by_default["reasons"][labels].tolist()
