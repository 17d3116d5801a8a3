"""``OnDemandTransform``'s ``function:`` named as ``uses:`` names a class: by a file path
relative to the spec's folder, or by module. A bad one fails with what to fix."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from stageline.context import stage_factory
from stageline.spec import PipelineSpec, SpecError, check_params, load_spec
from stageline.stages.transform import OnDemandTransform

TRANSFORMS = """\
from stageline.stages.transform import on_demand


@on_demand(requires=["debt", "income"], provides=["debt_ratio"])
def add_ratio(df):
    return pd_frame(debt_ratio=df["debt"] / df["income"])


def not_declared(df):
    return df


def pd_frame(**columns):
    import pandas as pd

    return pd.DataFrame(columns)
"""

SPEC = """\
name: ratios
request:
  id_field: id
  fields:
    id: {{type: str}}
    debt: {{type: float}}
    income: {{type: float}}
stages:
  - name: ratio
    uses: stageline.stages.transform:OnDemandTransform
    params: {{function: "{function}"}}
  - name: decide
    uses: stageline.stages.postprocess:Decision
"""


def write_spec(folder: Path, function: str) -> Path:
    """A spec in ``folder`` with its transforms file beside it."""
    (folder / "my_transforms.py").write_text(TRANSFORMS)
    path = folder / "pipeline.yaml"
    path.write_text(SPEC.format(function=function))
    return path


def transform_stage(spec: PipelineSpec, home: Path) -> OnDemandTransform:
    cls, kwargs = stage_factory(spec, spec.stage("ratio"), home)
    stage = cls(**kwargs)
    assert isinstance(stage, OnDemandTransform)
    return stage


def test_a_transform_file_beside_the_spec_runs_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = load_spec(write_spec(tmp_path, "my_transforms.py:add_ratio"))
    monkeypatch.chdir("/")  # the path is the spec's, not the working directory's

    stage = transform_stage(spec, tmp_path / "home")
    out = stage(pd.DataFrame({"debt": [1.0, 3.0], "income": [4.0, 6.0]}))

    assert stage.required_columns() == ("debt", "income")
    assert out["debt_ratio"].tolist() == [0.25, 0.5]


@pytest.mark.parametrize(
    ("function", "says"),
    [
        pytest.param(
            "missing.py:add_ratio",
            ["cannot import transform file", "missing.py'", "no such file"],
            id="no-such-file",
        ),
        pytest.param(
            "my_transforms.py:add_ration",
            ["module 'my_transforms.py' has no function 'add_ration'"],
            id="no-such-function",
        ),
        pytest.param(
            "my_transforms.py:not_declared",
            ["is not a transform: decorate it with @on_demand("],
            id="not-declared",
        ),
        pytest.param(
            "my_transforms:add_ratio",
            ["No module named 'my_transforms'", "as 'my_transforms.py:add_ratio'"],
            id="module-that-is-a-file",
        ),
        pytest.param(
            "add_ratio",
            ["expected 'package.module:function' or 'path/to/file.py:function'"],
            id="no-module",
        ),
    ],
)
def test_a_bad_function_says_what_to_fix(tmp_path: Path, function: str, says: list[str]) -> None:
    path = write_spec(tmp_path, function)
    spec = load_spec(path, check_stages=False)

    # When the spec loads, the stage checks its params without being built ...
    with pytest.raises(SpecError) as at_load:
        check_params(OnDemandTransform, spec.stage("ratio").params, spec.base_dir)
    # ... and when it is built, the stage names itself.
    with pytest.raises(SpecError) as at_build:
        transform_stage(spec, tmp_path / "home")

    assert str(at_build.value).startswith("stage 'ratio': function: ")
    for message in (str(at_load.value), str(at_build.value)):
        for fragment in says:
            assert fragment in message, message
    if function.startswith("missing.py"):
        assert str(tmp_path / "missing.py") in str(at_build.value)  # the path it tried


def test_load_spec_catches_a_transform_module_without_the_function(tmp_path: Path) -> None:
    path = write_spec(tmp_path, "stageline.demo.transforms:no_such_transform")

    with pytest.raises(SpecError) as caught:
        load_spec(path)

    message = str(caught.value)
    assert "stages[0].params (line" in message
    assert "module 'stageline.demo.transforms' has no function 'no_such_transform'" in message


def test_load_spec_catches_a_transform_file_that_is_not_there(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as caught:
        load_spec(write_spec(tmp_path, "missing.py:add_ratio"))

    message = str(caught.value)
    assert "stages[0].params (line" in message, message
    assert str(tmp_path / "missing.py") in message, message
