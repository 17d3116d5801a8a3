"""``python -m batch_app --spec S --input I --output O [--home H] [--full] [--as-of] ...``.

The same command as ``stageline batch``; the form a cluster runs:
``ray job submit --working-dir . -- python -m batch_app --spec ... --input s3://...``
(inside a job, ``$RAY_ADDRESS`` points the run at that cluster).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from stageline.localray import use_loopback
from stageline_cli import build_parser, main


def starts_local_ray(argv: Sequence[str]) -> bool:
    """Whether ``stageline batch argv`` starts a Ray of its own (no cluster named)."""
    args, _ = build_parser().parse_known_args(["batch", *argv])
    return not (args.address or os.environ.get("RAY_ADDRESS"))


if __name__ == "__main__":
    if starts_local_ray(sys.argv[1:]):
        use_loopback()  # before anything imports Ray, which reads the setting once
    sys.exit(main(["batch", *sys.argv[1:]]))
