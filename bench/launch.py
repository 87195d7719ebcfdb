"""`python -m bench.launch server|worker [ARG ...]`: run everruns' control plane or worker
exactly as `python -m everruns.server` / `python -m everruns.worker` would.

The benchmark starts everruns' processes through this so that their command lines contain
neither ``everruns.server`` nor ``everruns.worker``: on a shared development machine other
sessions clean up their own processes by command-line pattern (a SIGTERM sent to every process
whose command line names ``everruns.server`` was observed), and a benchmark process caught by
such a sweep would be measured dead. `runpy.run_module` with ``alter_sys`` is what ``-m`` does,
so the process is otherwise identical. Nothing else belongs here.
"""

from __future__ import annotations

import runpy
import sys

MODULES = {"server": "everruns.server", "worker": "everruns.worker"}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in MODULES:
        print("usage: python -m bench.launch server|worker [ARG ...]", file=sys.stderr)
        sys.exit(2)
    module = MODULES[sys.argv[1]]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
