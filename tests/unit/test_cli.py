"""The ``stageline`` command: help, one-line errors, the registry, predict and homes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from stageline import Pipeline
from stageline.registry import LocalRegistry
from stageline_cli import main
from stageline_cli import registry as registry_cli
from tests.conftest import FRAUD_SPEC, ROOT, register_challenger

SPEC = str(FRAUD_SPEC)
PREDICTION_KEYS = {
    "transaction_id",
    "score",
    "label",
    "reasons",
    "model_name",
    "model_version",
    "error",
}
PREDICT = ["predict", "--spec", SPEC]
TINY_DEMO = ["--customers", "200", "--transactions", "3000", "--days", "10", "--rounds", "20"]


def cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def home_copy(demo_home: Path, tmp_path: Path) -> Path:
    """A writable copy of the session's demo home."""
    return Path(shutil.copytree(demo_home, tmp_path / "home"))


@pytest.fixture
def records(good_record: dict[str, object]) -> list[dict[str, object]]:
    """A known customer, an unknown one, and a record the schema rejects."""
    return [
        good_record,
        {**good_record, "transaction_id": "t-2", "customer_id": "nobody", "amount": 900.0},
        {**good_record, "transaction_id": "t-3", "amount": -5},
    ]


def stdout_predictions(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines()]


def registry_rows(out: str) -> dict[str, list[str]]:
    """``registry list`` output as {version: [model, version, aliases, task, ...]}."""
    header, *rows = (line.split() for line in out.splitlines())
    assert header[:5] == ["MODEL", "VERSION", "ALIASES", "TASK", "METRICS"]
    return {row[1]: row for row in rows}


# --------------------------------------------------------------------------- help


HELP = {
    "stageline": ["demo", "predict", "registry", "materialize", "--home", "STAGELINE_HOME"],
    "demo": ["--spec", "--customers", "--transactions", "--days", "--seed", "--rounds", "--online"],
    "predict": ["--spec", "--input", "--output", "--home", ".parquet", ".jsonl", "--online"],
    "registry": ["list", "show", "alias", "--home"],
    "registry list": ["--home", "aliases"],
    "registry show": ["NAME@ALIAS", "NAME@VERSION", "--home"],
    "registry alias": ["champion", "version", "--home"],
    "materialize": ["--spec", "--view", "--home", "online store", "--online", "redis://"],
    "serve": ["--model", "--challenger", "--challenger-mode", "shadow,canary,off", "--sticky-by"],
}


@pytest.mark.parametrize("command", HELP)
def test_help_explains_every_command(capsys: pytest.CaptureFixture[str], command: str) -> None:
    argv = command.split()[1:] if command == "stageline" else command.split()
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    out, _ = capsys.readouterr()
    assert exit_.value.code == 0
    assert out.startswith(f"usage: {' '.join(['stageline', *argv])}")
    missing = [m for m in HELP[command] if m not in out]
    assert not missing, f"`{command} --help` does not mention {missing}"


def test_a_canary_share_outside_0_to_1_is_refused_before_anything_starts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--challenger", "fraud@challenger", "--share", "10"])
    assert exit_.value.code == 2
    assert "'10' is not a share from 0 to 1" in capsys.readouterr().err


# --------------------------------------------------------------------------- errors


ERRORS = {
    "missing input": (
        [*PREDICT, "--input", "{tmp}/nope.parquet", "--home", "{home}"],
        ["no such input file", "nope.parquet"],
    ),
    "spec with an unknown key": (
        ["predict", "--spec", "{tmp}/bad.yaml", "--input", "{tmp}/in.csv", "--home", "{home}"],
        ["bad.yaml", "serve.colour (line", "unknown key"],
    ),
    "unknown model": (["registry", "show", "nosuch", "--home", "{home}"], ["no model 'nosuch'"]),
    "bad model reference": (
        ["registry", "show", "fraud@@1", "--home", "{home}"],
        ["bad model reference", "fraud@champion"],
    ),
    "alias to a missing version": (
        ["registry", "alias", "fraud", "champion", "9", "--home", "{copy}"],
        ["no version 9", "versions: 1"],
    ),
    "unknown input format": (
        [*PREDICT, "--input", "{tmp}/in.xlsx", "--home", "{home}"],
        ["unknown input format '.xlsx'", ".csv"],
    ),
    "unknown output format": (
        [*PREDICT, "--input", "{tmp}/in.csv", "--output", "{tmp}/out.xlsx", "--home", "{home}"],
        ["unknown output format '.xlsx'", ".jsonl"],
    ),
    "unknown feature view": (
        ["materialize", "--spec", SPEC, "--view", "nope", "--home", "{copy}"],
        ["unknown feature view", "customer_stats"],
    ),
}


@pytest.fixture
def error_files(tmp_path: Path, records: list[dict[str, object]]) -> Path:
    """Inputs for the error cases: a spec with a typo, a CSV and an .xlsx file."""
    spec = FRAUD_SPEC.read_text().replace("serve:\n", "serve:\n  colour: blue\n", 1)
    (tmp_path / "bad.yaml").write_text(spec)
    pd.DataFrame(records).to_csv(tmp_path / "in.csv", index=False)
    (tmp_path / "in.xlsx").write_bytes(b"PK\x03\x04 not a table we read")
    return tmp_path


def expand(argv: list[str], **paths: Path) -> list[str]:
    return [a.format(**paths) for a in argv]


def assert_one_error(code: int, err: str, fragments: list[str]) -> None:
    """Exit 1, a headline starting 'stageline: error:', no traceback.

    A spec with problems lists them on indented lines under the headline.
    """
    assert code == 1, err
    assert "Traceback" not in err
    headline, *details = err.rstrip("\n").split("\n")
    assert headline.startswith("stageline: error: "), err
    assert all(line.startswith("  ") for line in details), err
    missing = [f for f in fragments if f not in err]
    assert not missing, f"error {err!r} does not mention {missing}"


@pytest.mark.parametrize("case", ERRORS, ids=list(ERRORS))
def test_errors_are_one_clear_message_with_exit_1(
    capsys: pytest.CaptureFixture[str],
    demo_home: Path,
    home_copy: Path,
    error_files: Path,
    case: str,
) -> None:
    template, fragments = ERRORS[case]
    argv = expand(template, tmp=error_files, home=demo_home, copy=home_copy)
    code, out, err = cli(capsys, *argv)
    assert_one_error(code, err, fragments)
    assert err.count("\n") == (2 if case == "spec with an unknown key" else 1)
    assert out == ""


def test_an_error_from_the_real_command_has_no_traceback(
    demo_home: Path, error_files: Path
) -> None:
    template, fragments = ERRORS["spec with an unknown key"]
    argv = expand(template, tmp=error_files, home=demo_home)
    run = subprocess.run(
        [sys.executable, "-m", "stageline_cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert_one_error(run.returncode, run.stderr, fragments)


def test_an_alias_to_a_missing_version_leaves_the_alias_alone(
    capsys: pytest.CaptureFixture[str], home_copy: Path
) -> None:
    code, _, _ = cli(capsys, "registry", "alias", "fraud", "champion", "9", "--home", home_copy)
    assert code == 1
    assert LocalRegistry(home_copy / "models").aliases("fraud") == {"champion": 1}


# --------------------------------------------------------------------------- registry


def test_registry_list_shows_the_demo_champion(
    capsys: pytest.CaptureFixture[str], demo_home: Path
) -> None:
    code, out, _ = cli(capsys, "registry", "list", "--home", demo_home)
    assert code == 0
    meta = LocalRegistry(demo_home / "models").resolve("fraud")
    (row,) = registry_rows(out).values()
    assert row[:4] == ["fraud", "1", "champion", "binary"]
    assert f"  {meta.metrics_summary()}  " in out
    assert meta.metrics_summary().startswith(f"auc {meta.metrics['auc']:.3g}")
    assert row[-1] == meta.sha256[:12]


@pytest.mark.parametrize("ref", ["fraud", "fraud@champion", "fraud@1"])
def test_registry_show_prints_the_version_metadata(
    capsys: pytest.CaptureFixture[str], demo_home: Path, ref: str
) -> None:
    code, out, _ = cli(capsys, "registry", "--home", demo_home, "show", ref)
    assert code == 0
    shown = json.loads(out)
    assert (shown["name"], shown["version"]) == ("fraud", 1)
    assert "auc" in shown["metrics"]
    assert shown["features"][0] == "amount"


def test_registry_alias_moves_the_champion_and_predict_follows(
    capsys: pytest.CaptureFixture[str],
    home_copy: Path,
    demo_home: Path,
    tmp_path: Path,
    good_record: dict[str, object],
) -> None:
    assert register_challenger(home_copy) == 2

    code, out, _ = cli(capsys, "registry", "alias", "fraud", "champion", "2", "--home", home_copy)
    assert (code, out) == (0, "fraud@champion -> v2 (was v1)\n")

    _, out, _ = cli(capsys, "registry", "list", "--home", home_copy)
    rows = registry_rows(out)
    assert (rows["1"][2], rows["2"][2]) == ("-", "challenger,champion")
    source = tmp_path / "one.jsonl"
    source.write_text(json.dumps(good_record) + "\n")
    _, out, _ = cli(capsys, "predict", "--spec", SPEC, "--input", source, "--home", home_copy)
    (prediction,) = stdout_predictions(out)
    assert (prediction["error"], prediction["model_version"]) == (None, 2)
    assert LocalRegistry(demo_home / "models").aliases("fraud") == {"champion": 1}


# --------------------------------------------------------------------------- predict


def test_predict_prints_one_json_line_per_record(
    capsys: pytest.CaptureFixture[str],
    demo_home: Path,
    tmp_path: Path,
    records: list[dict[str, object]],
) -> None:
    source = tmp_path / "records.parquet"
    pd.DataFrame(records).to_parquet(source)

    code, out, err = cli(capsys, "predict", "--spec", SPEC, "--input", source, "--home", demo_home)

    assert code == 0
    known, unknown, bad = stdout_predictions(out)
    for row, record in zip((known, unknown, bad), records, strict=True):
        assert set(row) == PREDICTION_KEYS
        assert row["transaction_id"] == record["transaction_id"]
    for row in (known, unknown):
        assert row["error"] is None
        assert isinstance(row["score"], float)
        assert 0.0 <= row["score"] <= 1.0
        assert isinstance(row["label"], bool)
        assert isinstance(row["reasons"], list)
        assert len(row["reasons"]) == (3 if row["label"] else 0), row  # a positive's
        assert (row["model_name"], row["model_version"]) == ("fraud", 1)
    assert bad["score"] is None
    assert str(bad["error"]).startswith("validate: amount: must be >= 0")
    assert "scored 2 of 3 rows (1 rejected" in err


def test_predict_into_a_reader_that_leaves_early_exits_quietly(
    demo_home: Path, holdout: pd.DataFrame, tmp_path: Path
) -> None:
    """``stageline predict ... | head -3``, the README's example: no error, status 141."""
    source = tmp_path / "many.parquet"
    # Far more JSON lines than a pipe buffers, so predict is still writing when head leaves.
    pd.concat([holdout] * max(1, 5_000 // len(holdout) + 1)).to_parquet(source)
    child = subprocess.Popen(
        [sys.executable, "-m", "stageline_cli", *PREDICT, "--input", source, "--home", demo_home],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert child.stdout is not None
    assert child.stderr is not None
    head = [child.stdout.readline() for _ in range(3)]
    child.stdout.close()
    err = child.stderr.read().decode()
    code = child.wait(timeout=120)

    assert all(json.loads(line)["transaction_id"] for line in head)
    assert err == "", err  # no "Broken pipe", no traceback, no summary line
    assert code == 141  # 128 + SIGPIPE: what a shell shows for `seq 1000000 | head -3`


def test_a_broken_pipe_that_is_not_stdout_is_still_an_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Say, a socket the command writes to: reported, not taken for `| head`."""

    def broken(args: object) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(registry_cli, "cmd_registry_list", broken)
    code, out, err = cli(capsys, "registry", "list")
    assert (code, out) == (1, "")
    assert err == "stageline: error: [Errno 32] Broken pipe\n"


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    frame.to_csv(path, index=False)


def write_jsonl(frame: pd.DataFrame, path: Path) -> None:
    frame.to_json(path, orient="records", lines=True)


def write_json(frame: pd.DataFrame, path: Path) -> None:
    path.write_text(json.dumps({"records": frame.to_dict(orient="records")}))


@pytest.mark.parametrize(
    ("suffix", "write"),
    [(".csv", write_csv), (".jsonl", write_jsonl), (".json", write_json)],
    ids=["csv", "jsonl", "json"],
)
def test_predict_reads_csv_and_json_inputs(
    capsys: pytest.CaptureFixture[str],
    demo_home: Path,
    fraud_pipeline: Pipeline,
    tmp_path: Path,
    records: list[dict[str, object]],
    suffix: str,
    write: Callable[[pd.DataFrame, Path], None],
) -> None:
    frame = pd.DataFrame(records)
    source = tmp_path / f"records{suffix}"
    write(frame, source)

    code, out, _ = cli(capsys, "predict", "--spec", SPEC, "--input", source, "--home", demo_home)

    assert code == 0
    got = stdout_predictions(out)
    expected = fraud_pipeline.predict(frame)
    assert [r["transaction_id"] for r in got] == expected["transaction_id"].tolist()
    assert [r["score"] for r in got[:2]] == expected["score"].iloc[:2].tolist()
    assert [r["error"] is None for r in got] == [True, True, False]


def test_predict_on_an_empty_home_builds_the_demo_first(
    capsys: pytest.CaptureFixture[str], error_files: Path
) -> None:
    home = error_files / "fresh"
    argv: list[str | Path] = [*PREDICT, "--input", error_files / "in.csv", "--home", home]

    code, out, err = cli(capsys, *argv)
    assert code == 0
    assert "building it first" in err
    assert (home / "demo" / "world.json").exists()
    assert [r["model_version"] for r in stdout_predictions(out)[:2]] == [1, 1]

    code, _, err = cli(capsys, *argv)  # the second run reuses it
    assert code == 0
    assert "building" not in err


# --------------------------------------------------------------------------- homes


def test_stageline_home_env_var_is_honoured(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    demo_home: Path,
    tmp_path: Path,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STAGELINE_HOME", raising=False)
    _, out, _ = cli(capsys, "registry", "list")
    assert "no models registered under" in out
    assert str(tmp_path / ".stageline") in out

    monkeypatch.setenv("STAGELINE_HOME", str(demo_home))
    code, out, _ = cli(capsys, "registry", "list")
    assert code == 0
    assert registry_rows(out)["1"][:3] == ["fraud", "1", "champion"]


def test_the_stageline_entry_point_runs(demo_home: Path, tmp_path: Path) -> None:
    executable = shutil.which("stageline")
    assert executable, "the `stageline` command is not on PATH: pip install -e ."
    run = subprocess.run(
        [executable, "registry", "list"],
        env={**os.environ, "STAGELINE_HOME": str(demo_home)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert registry_rows(run.stdout)["1"][:3] == ["fraud", "1", "champion"]


def test_demo_builds_once_and_force_rebuilds(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv: list[str | Path] = ["demo", "--spec", SPEC, "--home", tmp_path, *TINY_DEMO]
    code, out, _ = cli(capsys, *argv)
    assert code == 0
    assert "registered fraud v1 as champion: held-out AUC" in out
    first = (tmp_path / "models" / "fraud" / "1" / "metadata.json").read_text()

    assert cli(capsys, *argv)[1].startswith("demo already built")
    assert (tmp_path / "models" / "fraud" / "1" / "metadata.json").read_text() == first

    code, out, _ = cli(capsys, *argv, "--force", "--seed", "8")
    assert code == 0
    assert "registered fraud v1 as champion" in out
    assert (tmp_path / "models" / "fraud" / "1" / "metadata.json").read_text() != first
    assert not (tmp_path / "models" / "fraud" / "2").exists()


def test_materialize_rewrites_the_online_snapshot(
    capsys: pytest.CaptureFixture[str], home_copy: Path
) -> None:
    snapshot = home_copy / "online" / "customer_stats.parquet"
    entities = len(pd.read_parquet(snapshot))
    snapshot.unlink()

    code, out, _ = cli(capsys, "materialize", "--spec", SPEC, "--home", home_copy)

    assert code == 0
    assert out == f"materialized customer_stats: {entities} entities -> memory online store\n"
    assert len(pd.read_parquet(snapshot)) == entities


def test_cli_runs_from_the_repo_root_with_the_default_spec(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, home_copy: Path
) -> None:
    monkeypatch.chdir(ROOT)
    code, out, _ = cli(capsys, "materialize", "--view", "customer_stats", "--home", home_copy)
    assert code == 0
    assert out.startswith("materialized customer_stats:")


def test_csv_input_treats_only_an_empty_field_as_missing(tmp_path: Path) -> None:
    from stageline_cli.predict import read_records

    path = tmp_path / "in.csv"
    path.write_text("transaction_id,country\nt1,NA\nt2,\nt3,null\n")
    frame = read_records(path)
    assert frame["country"].tolist()[0] == "NA"  # Namibia, not a null
    assert pd.isna(frame["country"].tolist()[1])
    assert frame["country"].tolist()[2] == "null"


# --------------------------------------------------------------------------- --debug


@pytest.mark.parametrize("how", ["flag", "env", "off"])
def test_debug_prints_the_traceback_of_an_error_a_user_can_fix(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    demo_home: Path,
    how: str,
) -> None:
    monkeypatch.delenv("STAGELINE_DEBUG", raising=False)
    if how == "env":
        monkeypatch.setenv("STAGELINE_DEBUG", "1")
    argv = ["registry", "show", "nosuch", "--home", str(demo_home)]

    code, out, err = cli(capsys, *(["--debug", *argv] if how == "flag" else argv))

    if how == "off":
        assert_one_error(code, err, ["no model 'nosuch'"])
        return
    assert (code, out) == (1, "")
    assert err.startswith("Traceback (most recent call last):")
    assert "ModelNotFoundError: no model 'nosuch'" in err
    assert err.splitlines()[-1].startswith("stageline: error: no model 'nosuch'")


def test_an_unexpected_error_keeps_its_traceback_and_a_hint(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def bug(args: object) -> int:
        counts: dict[str, int] = {}
        return counts["no such key"]

    monkeypatch.delenv("STAGELINE_DEBUG", raising=False)
    monkeypatch.setattr(registry_cli, "cmd_registry_list", bug)
    code, out, err = cli(capsys, "registry", "list")

    assert (code, out) == (1, "")
    assert err.startswith("Traceback (most recent call last):")
    assert "KeyError: 'no such key'" in err
    hint = err.splitlines()[-1]
    assert hint.startswith("stageline: unexpected KeyError (traceback above)")
    assert "please report it" in hint


# --------------------------------------------------------------------------- busy ports


@pytest.mark.parametrize("option", ["--port", "--metrics-port"])
def test_serve_on_a_busy_port_is_one_line_naming_the_port_and_option(
    capsys: pytest.CaptureFixture[str], home_copy: Path, option: str
) -> None:
    import socket

    from tests.conftest import free_port

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        busy = held.getsockname()[1]
        ports = {"--port": free_port(), "--metrics-port": free_port(), option: busy}
        options = [str(a) for pair in ports.items() for a in pair]
        code, out, err = cli(capsys, "serve", "--spec", SPEC, "--home", home_copy, *options)

    assert_one_error(code, err, [f"port {busy} on 127.0.0.1 is in use", f"with {option}"])
    assert out == ""
    assert not (home_copy / "run" / "serve.json").exists()  # nothing was started
