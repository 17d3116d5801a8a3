"""stageline: one tabular inference pipeline, run online (Ray Serve) and in batch (Ray Data).

This package is the core: plain pandas and XGBoost. It never imports Ray.
"""

from stageline.pipeline import Pipeline, predictions
from stageline.spec import PipelineSpec, SpecError, load_spec
from stageline.stage import ERROR_COLUMN, BaseStage, Stage, StageError, check_columns, mark_errors

__all__ = [
    "ERROR_COLUMN",
    "BaseStage",
    "Pipeline",
    "PipelineSpec",
    "SpecError",
    "Stage",
    "StageError",
    "check_columns",
    "load_spec",
    "mark_errors",
    "predictions",
]
__version__ = "0.1.0"
