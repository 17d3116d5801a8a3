"""The model stage alone: XGBoost ``inplace_predict`` against ``DMatrix`` + ``predict``.

    python -m bench.model [--home H] [--repeat N] [--results DIR] [--smoke]

The demo model on the demo's held-out transactions, featurized by the pipeline's
own stages; the booster set up as the model stage sets it (``nthread`` from the
spec). Median time per call over ``--repeat`` calls at each batch size, per row,
and the ratio.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xgboost as xgb

from bench.report import add_run_options, markdown, median_seconds, write
from stageline.context import StageContext, resolve_home
from stageline.demo.world import ensure_demo
from stageline.pipeline import StageChain
from stageline.spec import load_spec
from stageline.stages.model import XGBoostPredictor
from stageline_cli.common import DEFAULT_SPEC

SIZES = (1, 8, 64, 512, 8192)
SMOKE_SIZES = (1, 8, 64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", help="stageline home with the demo (built if missing)")
    parser.add_argument("--repeat", type=int, default=50, help="calls per size (default 50)")
    add_run_options(parser)
    args = parser.parse_args(argv)
    sizes, repeat = (SMOKE_SIZES, 5) if args.smoke else (SIZES, args.repeat)
    spec, home = load_spec(Path(DEFAULT_SPEC)), resolve_home(args.home)
    ensure_demo(spec, home)

    holdout = pd.read_parquet(home / "demo" / "holdout.parquet").head(max(sizes))
    model_stage = next(s for s in spec.stages if s.uses.endswith(":XGBoostPredictor"))
    before = [s.name for s in spec.stages[: spec.stages.index(model_stage)]]
    frame = StageChain(spec, before, home, validate=True)(holdout)
    stage = XGBoostPredictor(
        **model_stage.params, context=StageContext(model_stage.name, spec, home)
    )
    matrix = stage.features(frame)
    booster = stage.loaded.booster
    names = list(stage.loaded.metadata.features)

    rows, table = [], []
    for n in sizes:
        part = np.ascontiguousarray(matrix[:n])

        def with_inplace(p: np.ndarray[Any, Any] = part) -> Any:
            return booster.inplace_predict(p, validate_features=False)

        def with_dmatrix(p: np.ndarray[Any, Any] = part) -> Any:
            return booster.predict(xgb.DMatrix(p, feature_names=names, nthread=stage.nthread))

        inplace, dmatrix = (
            median_seconds(with_inplace, repeat),
            median_seconds(with_dmatrix, repeat),
        )
        same = np.array_equal(with_inplace(), with_dmatrix())
        rows.append(
            {"batch": n, "inplace_s": inplace, "dmatrix_s": dmatrix, "identical": bool(same)}
        )
        table.append(
            [
                n,
                f"{inplace * 1e3:.3f}",
                f"{dmatrix * 1e3:.3f}",
                f"{inplace / n * 1e6:.2f}",
                f"{dmatrix / n * 1e6:.2f}",
                f"{dmatrix / inplace:.2f}x",
                "yes" if same else "NO",
            ]
        )
    header = [
        "batch rows",
        "inplace ms/call",
        "DMatrix ms/call",
        "inplace µs/row",
        "DMatrix µs/row",
        "DMatrix / inplace",
        "same scores",
    ]
    config = {
        "model": model_stage.params,
        "nthread": stage.nthread,
        "repeat": repeat,
        "smoke": args.smoke,
    }
    write("model", config, rows, markdown(header, table), args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
