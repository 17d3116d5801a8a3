"""The core package never imports Ray: every module, in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT

PROBE = """
import importlib, json, pkgutil, sys
import stageline, stageline.cli

failed = []
modules = [m.name for m in pkgutil.walk_packages(
    stageline.__path__, "stageline.", onerror=lambda name: failed.append(name))]
for name in modules:
    importlib.import_module(name)
ray = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
print(json.dumps({"modules": modules, "failed": failed, "ray": ray}))
"""


def test_importing_every_stageline_module_does_not_import_ray() -> None:
    run = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.splitlines()[-1])

    assert report["failed"] == [], "these packages failed to import while walking"
    assert set(report["modules"]) >= {
        "stageline.cli",
        "stageline.pipeline",
        "stageline.features.online",
        "stageline.demo.train",
        "stageline.stages.model",
    }
    assert report["ray"] == [], (
        f"stageline imported {report['ray']}; the core must never import Ray "
        "(import it lazily inside serve_app/ or batch_app/ instead)"
    )
