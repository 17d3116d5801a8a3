"""Champion and challenger without Ray: a model stage with a challenger in shadow mode
answers exactly as the champion alone while the prediction log gets the challenger's
scores of the same records; in canary mode a hashed, sticky share of entities is
answered by the challenger, the same in every stage instance and process; both are
switched at run time through ``reconfigure``; ``stageline evaluate`` puts the two side
by side."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest

from serve_app.http import ApiKey
from serve_app.router import make_router
from stageline.challenger import in_canary
from stageline.demo.train import EVENTS, DemoResult
from stageline.monitoring import compare, labelled
from stageline.pipeline import Pipeline, StageChain
from stageline.predlog import REQUEST_ID, PredictionLog, read_log, scored_rows
from stageline.registry import LocalRegistry
from stageline.service import ChainRunner, LoggedContract, ScoringService, UserConfig
from stageline.spec import PipelineSpec, SpecError, load_spec
from stageline.spec_challenger import ChallengerSpec
from stageline.training import Trained, train
from stageline_cli.main import main
from tests.conftest import FRAUD_SPEC

ROWS = 3000  # of the holdout: enough for the statistics, quick to score


@pytest.fixture(scope="module")
def world(demo: DemoResult, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Trained]:
    """A copy of the demo home with a second, different model registered as
    ``fraud@challenger`` (v2); read-only for the tests of this module."""
    home = tmp_path_factory.mktemp("challenger") / "home"
    shutil.copytree(demo.home, home, ignore=shutil.ignore_patterns("logs"))
    spec = load_spec(FRAUD_SPEC)
    challenger = train(
        spec, pd.read_parquet(home / EVENTS), home, alias="challenger", seed=8, rounds=20
    )
    return home, challenger


@pytest.fixture
def home(world: tuple[Path, Trained], tmp_path: Path) -> Path:
    """This test's own home (its own prediction log) with the module's models."""
    copy = tmp_path / "home"
    shutil.copytree(world[0], copy)
    return copy


@pytest.fixture(scope="module")
def records(demo: DemoResult) -> pd.DataFrame:
    spec = load_spec(FRAUD_SPEC)
    return pd.read_parquet(demo.holdout)[list(spec.request.fields)].head(ROWS)


def with_challenger(spec: PipelineSpec, **challenger: Any) -> PipelineSpec:
    """``spec`` with a challenger on its model stage."""
    stages = tuple(
        s.model_copy(update={"challenger": ChallengerSpec.model_validate(challenger)})
        if s.name == "model"
        else s
        for s in spec.stages
    )
    return spec.model_copy(update={"stages": stages})


def alone(spec: PipelineSpec, home: Path, alias: str, frame: pd.DataFrame) -> pd.DataFrame:
    """What the pipeline computes with ``alias`` as its only model."""
    pipe = Pipeline(spec, home)
    pipe.reconfigure({"model": {"alias": alias}})
    return pipe(frame)


# --------------------------------------------------------------------------- shadow


def test_shadow_answers_exactly_as_the_champion_alone_and_scores_the_challenger_beside(
    fraud_spec: PipelineSpec, home: Path, records: pd.DataFrame
) -> None:
    shadow = Pipeline(with_challenger(fraud_spec, alias="challenger", mode="shadow"), home)
    champion_only = Pipeline(fraud_spec, home)

    pd.testing.assert_frame_equal(shadow.predict(records), champion_only.predict(records))
    scored = shadow(records)
    challenger = alone(fraud_spec, home, "challenger", records)
    np.testing.assert_array_equal(scored["score_challenger"], challenger["score"])
    assert set(scored["score_challenger_version"]) == {2}
    assert set(scored["score_version"]) == {1}
    assert set(scored["score_role"]) == {"champion"}
    assert set(scored["score_mode"]) == {"shadow"}
    # A different model: the comparison is not of a model with itself.
    assert not np.allclose(scored["score_challenger"], scored["score"])


def serve_logged(spec: PipelineSpec, home: Path, bodies: list[dict[str, Any]]) -> list[Any]:
    """``bodies`` posted to /predict of the router over the whole pipeline in process,
    every prediction logged (as the Serve ingress does); the answers' JSON."""
    log = PredictionLog(home, pipeline=spec.name, spec=spec.prediction_log, prepare=scored_rows)
    chains = [
        StageChain(spec, [], home, validate=True),
        StageChain(spec, [s.name for s in spec.stages], home),
    ]
    service = ScoringService(spec, ChainRunner(chains, LoggedContract(spec, log)))
    app = make_router(service, ApiKey("STAGELINE_TEST_CHALLENGER_KEY"))

    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            return [await http.post("/predict", json=body) for body in bodies]

    answers = asyncio.run(go())
    assert log.close()
    assert [a.status_code for a in answers] == [200] * len(answers)
    return [a.json() for a in answers]


def test_shadow_over_the_api_answers_the_champion_and_logs_both_models_of_each_record(
    fraud_spec: PipelineSpec, home: Path, records: pd.DataFrame
) -> None:
    some = records.head(40).assign(ts=records["ts"].head(40).map(lambda t: t.isoformat()))
    bodies = [{"records": some.iloc[i : i + 4].to_dict("records")} for i in range(0, 40, 4)]
    spec = with_challenger(fraud_spec, alias="challenger", mode="shadow")
    answers = serve_logged(spec, home, bodies)

    champion = alone(fraud_spec, home, "champion", some).set_index("transaction_id")
    challenger = alone(fraud_spec, home, "challenger", some).set_index("transaction_id")
    logged = read_log(home / "logs" / "fraud").set_index("transaction_id")
    assert len(logged) == 40
    for answer in answers:
        assert answer["model"] == {"name": "fraud", "version": 1}
        for p in answer["predictions"]:
            tid = p["transaction_id"]
            assert set(p) == {"transaction_id", "score", "label", "reasons"}  # nothing more
            assert p["score"] == champion.loc[tid, "score"]
            assert logged.loc[tid, "score"] == champion.loc[tid, "score"]
            assert logged.loc[tid, "score_challenger"] == challenger.loc[tid, "score"]
            assert logged.loc[tid, "score_challenger_version"] == 2
            assert logged.loc[tid, "score_role"] == "champion"
            assert logged.loc[tid, "score_mode"] == "shadow"


# --------------------------------------------------------------------------- canary


@pytest.mark.parametrize("share", [0.05, 0.1, 0.5])
def test_the_canary_takes_its_share_of_entities_within_binomial_tolerance(share: float) -> None:
    n = 40_000
    keys = pd.Series([f"customer-{i}" for i in range(n)])
    picked = in_canary(keys, share)
    sigma = (n * share * (1 - share)) ** 0.5
    assert abs(picked.sum() - n * share) < 4 * sigma, (picked.sum(), n * share)
    # Sticky: the same keys in another order, or alone, get the same answer.
    shuffled = keys.sample(frac=1, random_state=3)
    assert (in_canary(shuffled, share) == picked[shuffled.index]).all()
    assert [bool(in_canary(keys[i : i + 1], share)[0]) for i in range(50)] == list(picked[:50])
    # Monotone: raising the share keeps every entity already in the canary there.
    assert not (picked & ~in_canary(keys, min(1.0, share * 2))).any()


def test_canary_membership_is_the_same_in_another_process_and_for_ints_and_strings() -> None:
    keys = pd.Series([f"c{i}" for i in range(2000)])
    here = in_canary(keys, 0.3)
    code = (
        "import pandas as pd; from stageline.challenger import in_canary; "
        "print(''.join('1' if x else '0' for x in "
        "in_canary(pd.Series([f'c{i}' for i in range(2000)]), 0.3)))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # Python's own str hash differs
    there = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert there == "".join("1" if x else "0" for x in here)
    # Pinned: a change of hash (a pandas upgrade, a new key) would move customers between
    # the models of a canary in flight; this says so before a release does.
    pinned = in_canary(pd.Series([f"customer-{i}" for i in range(40)]), 0.5)
    assert "".join("1" if x else "0" for x in pinned) == "1010110100000001101001011010000000000001"
    numbers = pd.Series(range(500))
    assert (in_canary(numbers, 0.3) == in_canary(numbers.astype(str), 0.3)).all()
    assert not in_canary(pd.Series([None, np.nan], dtype=object), 1.0).any()  # no key: champion


def test_canary_answers_a_sticky_share_of_customers_the_same_in_every_stage_instance(
    fraud_spec: PipelineSpec, home: Path, records: pd.DataFrame
) -> None:
    spec = with_challenger(
        fraud_spec, alias="challenger", mode="canary", share=0.3, sticky_by="customer_id"
    )
    one = Pipeline(spec, home).predict(records)
    # Another instance (a replica, a restart), scoring the records in other batches.
    other = Pipeline(spec, home)
    parts = [other.predict(records.iloc[i : i + 7]) for i in range(0, len(records), 7)]
    pd.testing.assert_frame_equal(pd.concat(parts, ignore_index=True), one)

    versions = one.assign(customer_id=records["customer_id"].to_numpy())
    per_customer = versions.groupby("customer_id")["model_version"].nunique()
    assert (per_customer == 1).all()  # every customer always gets the same model
    customers = versions.groupby("customer_id")["model_version"].first()
    n = len(customers)
    sigma = (n * 0.3 * 0.7) ** 0.5
    assert abs((customers == 2).sum() - 0.3 * n) < 4 * sigma
    # Each answer is its model's own, and says which model gave it.
    champion = alone(fraud_spec, home, "champion", records)
    challenger = alone(fraud_spec, home, "challenger", records)
    by_challenger = (one["model_version"] == 2).to_numpy()
    expected = np.where(by_challenger, challenger["score"], champion["score"])
    np.testing.assert_array_equal(one["score"], expected)
    np.testing.assert_array_equal(
        one["label"], np.where(by_challenger, challenger["label"], champion["label"])
    )
    pairs = zip(by_challenger, challenger["reasons"], champion["reasons"], strict=True)
    assert list(one["reasons"]) == [theirs if b else ours for b, theirs, ours in pairs]


def test_a_mixed_canary_answer_names_the_model_of_each_prediction(
    fraud_spec: PipelineSpec, home: Path, records: pd.DataFrame
) -> None:
    spec = with_challenger(
        fraud_spec, alias="challenger", mode="canary", share=0.5, sticky_by="customer_id"
    )
    some = records.head(40).assign(ts=records["ts"].head(40).map(lambda t: t.isoformat()))
    [answer] = serve_logged(spec, home, [{"records": some.to_dict("records")}])
    logged = read_log(home / "logs" / "fraud").set_index("transaction_id")
    versions = {p["model"]["version"] for p in answer["predictions"]}
    assert versions == {1, 2}
    for p in answer["predictions"]:
        row = logged.loc[p["transaction_id"]]
        assert p["model"]["version"] == row["score_version"]
        assert row["score_role"] == ("challenger" if p["model"]["version"] == 2 else "champion")
        assert row["score_mode"] == "canary"


def test_a_row_either_model_cannot_score_is_marked_and_the_others_are_answered(
    fraud_spec: PipelineSpec, home: Path, records: pd.DataFrame
) -> None:
    spec = with_challenger(
        fraud_spec, alias="challenger", mode="canary", share=0.5, sticky_by="customer_id"
    )
    features = Pipeline(fraud_spec, home)(records.head(200))
    features = features[[c for c in features.columns if not c.startswith(("score", "label"))]]
    broken = features.assign(avg_amount_30d=np.where(np.arange(200) < 20, np.inf, 1.0))
    scored = StageChain(spec, ["model"], home)(broken)
    picked = in_canary(broken["customer_id"], 0.5)
    assert 0 < picked[:20].sum() < 20  # both models meet a broken row
    errors = scored["_error"].to_numpy()
    assert list(errors[:20]) == ["model: avg_amount_30d: not a finite number"] * 20
    assert pd.isna(errors[20:]).all()
    assert list(scored["score_version"][20:]) == [2 if p else 1 for p in picked[20:]]


# --------------------------------------------------------------------------- run time


def test_modes_switch_at_run_time_through_the_user_config_and_a_bad_one_keeps_the_last(
    fraud_spec: PipelineSpec, home: Path, records: pd.DataFrame
) -> None:
    some = records.head(200)
    pipe = Pipeline(fraud_spec, home)
    plain = pipe.predict(some)

    def switch(challenger: Any) -> None:
        config = UserConfig.model_validate(
            {"stages": {"model": {"alias": "champion", "challenger": challenger}}}
        )
        pipe.reconfigure(config.stages)

    switch({"alias": "challenger", "mode": "shadow"})
    shadowed = pipe(some)
    assert set(shadowed["score_challenger_version"]) == {2}
    pd.testing.assert_frame_equal(pipe.predict(some), plain)

    switch({"alias": "challenger", "mode": "canary", "share": 1.0, "sticky_by": "customer_id"})
    assert set(pipe.predict(some)["model_version"]) == {2}
    assert "score_challenger" not in pipe(some).columns
    [status] = [s.model for s in pipe.status().values() if s.model is not None]
    assert status is not None
    assert status.challenger is not None
    assert (status.challenger["version"], status.challenger["mode"]) == (2, "canary")

    # A challenger that cannot load is reported; the canary keeps going as it was.
    switch({"alias": "nope", "mode": "shadow"})
    assert set(pipe.predict(some)["model_version"]) == {2}
    [status] = [s.model for s in pipe.status().values() if s.model is not None]
    assert status is not None
    assert status.challenger is not None
    assert "nope" in str(status.challenger["load_error"])

    switch({"alias": "challenger", "mode": "canary", "sticky_by": "custmer_id"})  # a typo
    assert set(pipe.predict(some)["model_version"]) == {2}
    [status] = [s.model for s in pipe.status().values() if s.model is not None]
    assert status is not None
    assert status.challenger is not None
    assert "'custmer_id' is not a field of the request" in str(status.challenger["load_error"])

    # A swap of the champion alone leaves the challenger as it is.
    pipe.reconfigure({"model": {"alias": "champion"}})
    assert set(pipe.predict(some)["model_version"]) == {2}

    switch({"alias": "challenger", "mode": "off"})
    pd.testing.assert_frame_equal(pipe.predict(some), plain)
    assert "score_role" not in pipe(some).columns
    switch(None)
    pd.testing.assert_frame_equal(pipe.predict(some), plain)


def test_a_challenger_is_checked_when_the_spec_loads(tmp_path: Path) -> None:
    text = FRAUD_SPEC.read_text()
    bad = text.replace(
        "    uses: stageline.stages.postprocess:Decision\n",
        "    uses: stageline.stages.postprocess:Decision\n    challenger: {alias: challenger}\n",
    )
    assert bad != text
    (tmp_path / "fraud.yaml").write_text(bad)
    with pytest.raises(SpecError, match=r"stages\[3\]\.challenger.*Decision takes no challenger"):
        load_spec(tmp_path / "fraud.yaml")
    both = text.replace(
        "    params: {model: fraud, alias: champion, reasons: 3}\n",
        "    params: {model: fraud, alias: champion, reasons: 3}\n"
        "    challenger: {alias: challenger, version: 2}\n",
    )
    assert both != text
    (tmp_path / "fraud.yaml").write_text(both)
    with pytest.raises(SpecError, match="alias or its version, not both"):
        load_spec(tmp_path / "fraud.yaml")


# --------------------------------------------------------------------------- evaluate


def log_scored(spec: PipelineSpec, home: Path, frame: pd.DataFrame) -> None:
    """``frame`` scored as training scored it (features as of each record's time) by
    ``spec``'s pipeline, logged as serving logs it."""
    scored = Pipeline(spec, home, as_of=True)(frame)
    scored[REQUEST_ID] = [f"r-{i}" for i in range(len(scored))]
    log = PredictionLog(home, pipeline=spec.name, spec=spec.prediction_log, prepare=scored_rows)
    log.log(scored)
    assert log.close()


def test_evaluate_puts_a_shadow_challenger_beside_the_champion_on_the_same_records(
    fraud_spec: PipelineSpec,
    home: Path,
    demo: DemoResult,
    world: tuple[Path, Trained],
    capsys: pytest.CaptureFixture[str],
) -> None:
    holdout = pd.read_parquet(demo.holdout)
    spec = with_challenger(fraud_spec, alias="challenger", mode="shadow")
    log_scored(spec, home, holdout[list(spec.request.fields)])
    labels = home / "labels.parquet"
    holdout[["transaction_id", "is_fraud"]].to_parquet(labels)

    found = labelled(fraud_spec, home, holdout)
    [shadow] = compare(found)
    assert (shadow.mode, shadow.champion, shadow.challenger) == ("shadow", 1, 2)
    assert shadow.n_champion == shadow.n_challenger == len(holdout)
    # The log reproduces each model's registered held-out AUC, on the same records.
    champion = LocalRegistry(home / "models").resolve("fraud", "champion")
    assert shadow.champion_metrics["auc"] == pytest.approx(champion.metrics["auc"], abs=1e-9)
    assert shadow.challenger_metrics["auc"] == pytest.approx(world[1].metrics["auc"], abs=1e-9)

    argv = ["evaluate", "--spec", str(FRAUD_SPEC), "--home", str(home), "--labels", str(labels)]
    assert main([*argv, "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    rows = [(r["version"], r["role"], r["mode"], r["n"]) for r in lines if "role" in r]
    n = len(holdout)
    assert rows == [(1, "champion", "shadow", n), (2, "challenger", "shadow", n)]
    [side_by_side] = [r for r in lines if "comparison" in r]
    assert side_by_side["champion"]["auc"] == pytest.approx(champion.metrics["auc"], abs=1e-9)
    assert side_by_side["challenger"]["version"] == 2
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"on the same {len(holdout)} labelled records" in printed
    assert "CHAMPION v1" in printed
    assert "CHALLENGER v2" in printed


def test_evaluate_compares_canary_models_each_on_its_own_traffic(
    fraud_spec: PipelineSpec, home: Path, demo: DemoResult
) -> None:
    holdout = pd.read_parquet(demo.holdout)
    spec = with_challenger(
        fraud_spec, alias="challenger", mode="canary", share=0.2, sticky_by="customer_id"
    )
    log_scored(spec, home, holdout[list(spec.request.fields)])

    found = labelled(fraud_spec, home, holdout)
    [canary] = compare(found)
    assert (canary.mode, canary.champion, canary.challenger) == ("canary", 1, 2)
    assert canary.n_champion + canary.n_challenger == len(holdout)
    taken = in_canary(holdout["customer_id"], 0.2)
    assert canary.n_challenger == taken.sum()
    # Each model's figures are those of the records it answered, and only those.
    ours = found.rows[found.rows["role"] == "champion"]
    assert set(ours["transaction_id"]) == set(holdout["transaction_id"][~taken])
    assert canary.champion_metrics["positive_rate"] == pytest.approx(
        holdout["is_fraud"][~taken].mean()
    )
