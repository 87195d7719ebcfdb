"""Every workflow and activity of everruns' benchmark, for a worker that serves them all.

``python -m everruns.worker bench.everruns_tasks``. The two halves live in
`bench.everruns_workflows` and `bench.everruns_activities` so that a worker can serve one half.
"""

from __future__ import annotations

from bench import everruns_activities, everruns_workflows

__all__ = ["everruns_activities", "everruns_workflows"]
