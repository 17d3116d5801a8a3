"""``python -m batch_app --spec S --input I --output O [--home H] [--full] [--address A]``.

The same command as ``stageline batch``; the form a cluster runs:
``ray job submit --working-dir . -- python -m batch_app --spec ... --input s3://...``
(inside a job, ``$RAY_ADDRESS`` points the run at that cluster).
"""

from __future__ import annotations

import sys

from stageline.cli import main

if __name__ == "__main__":
    sys.exit(main(["batch", *sys.argv[1:]]))
