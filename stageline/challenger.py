"""Champion and challenger: which rows a canary takes, and the columns that say who
answered.

A model stage with a challenger (:class:`~stageline.spec_challenger.ChallengerSpec`) adds,
for its output ``<o>``:

- ``<o>_role``: ``champion`` or ``challenger``, the model that gave the row's answer
  (``<o>``, ``<o>_model``, ``<o>_version``...);
- ``<o>_mode``: ``shadow`` or ``canary``;
- in shadow mode, the challenger's own prediction under ``<o>_challenger``
  (``<o>_challenger``, ``<o>_challenger_threshold`` or ``_class``/``_p_<class>``,
  ``<o>_challenger_model``, ``<o>_challenger_version``): never answered, only logged.

The prediction log keeps every column, so :func:`predictions_by_role` can unfold a
logged frame into one row per model that scored a record, for ``stageline evaluate``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

CHAMPION, CHALLENGER = "champion", "challenger"
SHADOW, CANARY = "shadow", "canary"

HASH_KEY = "stageline-canary"
"""The key of the canary's hash (16 characters, as pandas wants): not the prediction
log's sampling hash, so being logged and being in the canary are independent."""


def role_column(output: str) -> str:
    return f"{output}_role"


def mode_column(output: str) -> str:
    return f"{output}_mode"


def shadow_output(output: str) -> str:
    """The output name under which a shadow challenger's columns go."""
    return f"{output}_{CHALLENGER}"


def in_canary(keys: pd.Series, share: float) -> np.ndarray[Any, np.dtype[np.bool_]]:
    """True for the rows whose entity (``keys``) the challenger answers at ``share``.

    A key is in the canary when its hash (of its text, so ``7`` and ``"7"`` are one
    entity) falls in the first ``share`` of the 64-bit range: the same in every process,
    replica and run, and monotone in ``share`` (an entity in at 10 % is in at 20 %).
    A missing key goes to the champion."""
    present: np.ndarray[Any, np.dtype[np.bool_]] = keys.notna().to_numpy(dtype=bool)
    if share <= 0 or share >= 1:
        return present & (share >= 1)
    hashes = pd.util.hash_pandas_object(keys.astype(str), index=False, hash_key=HASH_KEY)
    return present & (hashes.to_numpy() < np.uint64(share * 2.0**64))


def predictions_by_role(frame: pd.DataFrame, output: str) -> pd.DataFrame:
    """Logged rows unfolded into one row per model that scored them: ``role``, ``mode``
    (empty when no challenger was configured), ``version`` and ``prediction``, beside the
    logged columns. A shadow-scored record gives two rows: the champion's answer and the
    challenger's prediction for the same record."""
    version = f"{output}_version"
    role, mode = role_column(output), mode_column(output)
    served = frame.assign(
        role=frame[role].fillna(CHAMPION) if role in frame else CHAMPION,
        mode=frame.get(mode, None),
        version=frame.get(version, np.nan),
        prediction=frame.get(output, np.nan),
    )
    shadow = shadow_output(output)
    parts = [served]
    if f"{shadow}_version" in frame.columns:
        scored = frame[frame[f"{shadow}_version"].notna()]
        parts.append(
            scored.assign(
                role=CHALLENGER,
                mode=SHADOW,
                version=scored[f"{shadow}_version"],
                prediction=scored[shadow],
            )
        )
    out = pd.concat(parts, ignore_index=True) if len(parts) > 1 else served
    return out[out["version"].notna()].reset_index(drop=True)
