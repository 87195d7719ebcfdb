"""`python -m everruns`: the `everruns` command line (see `everruns.cli`)."""

from __future__ import annotations

import sys

from everruns.cli import main

if __name__ == "__main__":
    sys.exit(main())
