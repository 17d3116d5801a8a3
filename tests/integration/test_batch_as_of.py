"""Batch scoring as of each row's event time (``--as-of``) on the session's local Ray:
the same predictions as the in-process pipeline, and one output never mixes modes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from batch_app.manifest import MANIFEST
from batch_app.run import run
from stageline import Pipeline
from stageline.context import AS_OF_FEATURES
from stageline.spec import PipelineSpec
from stageline_cli import main
from tests.conftest import FRAUD_SPEC
from tests.integration.test_batch import REQUEST, scored

pytestmark = pytest.mark.integration


def test_batch_as_of_scores_equal_in_process_as_of_scores(
    ray_session: None, fraud_spec: PipelineSpec, demo_home: Path, holdout: pd.DataFrame, tmp_path
):
    rows = holdout.iloc[:1500][REQUEST].reset_index(drop=True)
    assert rows["customer_id"].str.startswith("u").any(), "want customers the store never saw"
    source = tmp_path / "in"
    source.mkdir()
    rows.iloc[:900].to_parquet(source / "part-0.parquet")
    rows.iloc[900:].to_parquet(source / "part-1.parquet")

    summary = run(fraud_spec, source, tmp_path / "out", demo_home, as_of=True)

    assert (summary.rows_in, summary.rows_out, summary.rows_quarantined) == (1500, 1500, 0)
    assert AS_OF_FEATURES in summary.line()
    out = scored(tmp_path / "out").set_index("transaction_id").loc[rows["transaction_id"]]
    expected = Pipeline(fraud_spec, demo_home, as_of=True).predict(rows)
    assert expected["error"].isna().all()
    np.testing.assert_array_equal(out["score"].to_numpy(), expected["score"].to_numpy())
    np.testing.assert_array_equal(out["label"].to_numpy(), expected["label"].to_numpy(bool))
    assert [list(r) for r in out["reasons"]] == [list(r) for r in expected["reasons"]]
    # The held-out rows predate the online store's latest values: as of their time,
    # most customers looked different, so the actors really did not score online.
    online = Pipeline(fraud_spec, demo_home).predict(rows)
    assert (out["score"].to_numpy() != online["score"].to_numpy()).mean() > 0.5
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["mode"] == "as-of"


@pytest.mark.parametrize(
    "first_as_of", [True, False], ids=["as-of-then-online", "online-then-as-of"]
)
def test_an_incremental_run_in_the_other_mode_is_refused(
    ray_session: None,
    fraud_spec: PipelineSpec,
    demo_home: Path,
    holdout: pd.DataFrame,
    tmp_path,
    capsys: pytest.CaptureFixture[str],
    first_as_of: bool,
):
    rows = holdout.iloc[:400][REQUEST].reset_index(drop=True)
    source, output = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    argv = ["batch", "--spec", str(FRAUD_SPEC), "--home", str(demo_home)]
    argv += ["--input", str(source), "--output", str(output)]
    first, other = (["--as-of"], []) if first_as_of else ([], ["--as-of"])

    rows.iloc[:200].to_parquet(source / "a.parquet")
    assert main(argv + first) == 0
    capsys.readouterr()
    manifest = (output / MANIFEST).read_bytes()
    published = scored(output)

    rows.iloc[200:].to_parquet(source / "b.parquet")  # new input, scored the other way
    assert main(argv + other) == 1

    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    for advice in ("never mixes", "--full", "another --output"):
        assert advice in err, err
    assert (output / MANIFEST).read_bytes() == manifest, "the refused run committed nothing"
    pd.testing.assert_frame_equal(scored(output), published)

    # --full rescores everything the other way, replacing the output.
    assert main([*argv, *other, "--full"]) == 0
    assert (AS_OF_FEATURES in capsys.readouterr().out) is not first_as_of
    out = scored(output).set_index("transaction_id").loc[rows["transaction_id"]]
    expected = Pipeline(fraud_spec, demo_home, as_of=not first_as_of).predict(rows)
    np.testing.assert_array_equal(out["score"].to_numpy(), expected["score"].to_numpy())
    mode = json.loads((output / MANIFEST).read_text())["mode"]
    assert mode == ("online" if first_as_of else "as-of")
