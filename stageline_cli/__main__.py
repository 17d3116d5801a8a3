"""``python -m stageline_cli``: the ``stageline`` command (and its supervised child)."""

from __future__ import annotations

import sys

from stageline_cli.main import main

if __name__ == "__main__":
    sys.exit(main())
