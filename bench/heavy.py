"""A model costlier than the demo's, with its features: a model stage that costs several
times the others per row, as a production model often does. ``bench.scale`` serves it
to show the stages scaling each on its own cost, and the e2e scaling test does too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xgboost

from stageline.registry import LocalRegistry

HEAVY = "heavy"
"""The alias the heavy model is registered under (``fraud@heavy``)."""
TREES = 1000
"""Its trees (depth 8): with the demo's 5 features, a few times the feature lookup's
cost per row."""


def register_heavy_model(home: Path, trees: int = TREES, alias: str = HEAVY) -> str:
    """Register, under ``home``'s registry and alias ``alias``, a model of ``trees`` deep
    trees on the fraud champion's features, encoders and threshold (its scores do not
    matter: it is trained on noise), unless the alias already names one of ``trees``
    trees. Returns the reference to serve, ``fraud@<alias>``."""
    registry = LocalRegistry(home / "models")
    held = alias in registry.aliases("fraud")
    if held and registry.load("fraud", alias).booster.num_boosted_rounds() == trees:
        return f"fraud@{alias}"
    champion = registry.load("fraud").metadata
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3000, len(champion.features)))
    y = (x[:, 0] + rng.normal(size=3000) > 0).astype(int)
    booster = xgboost.train(
        {"objective": "binary:logistic", "max_depth": 8, "nthread": 1},
        xgboost.DMatrix(x, label=y, feature_names=list(champion.features)),
        num_boost_round=trees,
    )
    registry.register(
        "fraud",
        booster,
        features=champion.features,
        encoders=champion.encoders,
        threshold=champion.threshold,
        aliases=[alias],
    )
    return f"fraud@{alias}"
