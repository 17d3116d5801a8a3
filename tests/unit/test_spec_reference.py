"""The spec reference is generated from the spec's models, and the copy in docs/ is it."""

from __future__ import annotations

from stageline.spec import PipelineSpec
from stageline.spec_reference import reference
from tests.conftest import ROOT


def test_the_reference_lists_every_key_of_every_section() -> None:
    text = reference()
    for name, field in PipelineSpec.model_fields.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| `{name}` |"))
        assert " ".join((field.description or "").split()) in row.replace("\\|", "|"), row
    for section in ("StageSpec", "RequestSchema", "FieldSpec", "OutputSpec", "IngressSpec"):
        assert f"\n## {section}\n" in text, section
    assert "| `max_records` | int | `1000` |" in text


def test_the_copy_in_docs_is_up_to_date() -> None:
    copy = (ROOT / "docs" / "spec-reference.md").read_text()
    assert copy == reference(), (
        "docs/spec-reference.md is stale: stageline spec --reference > docs/spec-reference.md"
    )


def test_stageline_spec_prints_the_reference_and_checks_a_spec() -> None:
    import subprocess
    import sys

    printed = subprocess.run(
        [sys.executable, "-m", "stageline_cli", "spec", "--reference"],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert printed.stdout == reference()
    checked = subprocess.run(
        [sys.executable, "-m", "stageline_cli", "spec", "--spec", "pipelines/fraud.yaml"],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert checked.stdout.startswith("fraud: valid; 6 request fields"), checked.stdout
