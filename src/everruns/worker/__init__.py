"""The worker: runs workflow and activity code for a control plane it reaches over gRPC.

`Worker` is embedded in a Trio program (``await nursery.start(worker.run)``) or run as a process
(``python -m everruns.worker MODULE ...``); activities receive an `ActivityContext`.
"""

from everruns.worker.activity import ActivityContext as ActivityContext
from everruns.worker.activity import ActivityInfo as ActivityInfo
from everruns.worker.config import WorkerConfig as WorkerConfig
from everruns.worker.runtime import Worker as Worker
