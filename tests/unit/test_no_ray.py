"""The core package never imports Ray: every module, in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT

PROBE = """
import importlib, json, pkgutil, sys
import stageline

failed = []
modules = [m.name for m in pkgutil.walk_packages(
    stageline.__path__, "stageline.", onerror=lambda name: failed.append(name))]
for name in modules:
    importlib.import_module(name)
adapters = sorted(m for m in sys.modules if m.split(".")[0] in ("serve_app", "batch_app"))
import serve_app.router  # the HTTP layer: FastAPI over the scoring service, no Ray
ray = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
print(json.dumps({"modules": modules, "failed": failed, "ray": ray, "adapters": adapters}))
"""


def test_the_core_and_the_http_layer_import_without_ray() -> None:
    run = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.splitlines()[-1])

    assert report["failed"] == [], "these packages failed to import while walking"
    assert set(report["modules"]) >= {
        "stageline.demo.world",
        "stageline.pipeline",
        "stageline.features.online",
        "stageline.demo.train",
        "stageline.stages.model",
        "stageline.service",
        "stageline.outputs",
        "stageline.predlog",
    }
    assert report["ray"] == [], (
        f"stageline imported {report['ray']}; the core must never import Ray "
        "(import it lazily inside serve_app/ or batch_app/ instead)"
    )
    assert report["adapters"] == [], (
        f"stageline imported {report['adapters']}: the core sits below the adapters; "
        "only the CLI (stageline_cli) imports them"
    )
