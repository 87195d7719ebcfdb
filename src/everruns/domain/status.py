"""Status vocabularies of workflows, tasks and workers, and which changes between them are legal.

The tables here are the single statement of the life cycles; the store consults them before
every status update so an illegal change (completing a cancelled workflow, completing a task
twice) is refused with a readable message instead of silently written. They mirror the status
CHECKs of the schema. Nothing here performs I/O or imports trio, asyncio, SQL or protobuf code.

A change to the same non-terminal status (``running`` -> ``running``, a retried ``pending``
task staying ``pending``) is always allowed: it changes no status. A change out of a terminal
status, to itself included, is always refused, which is what makes a duplicate completion fail.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, get_args

from everruns.errors import FailedPrecondition, InvalidArgument

__all__ = [
    "TASK_STATUSES",
    "TASK_TRANSITIONS",
    "TERMINAL_TASK_STATUSES",
    "TERMINAL_WORKFLOW_STATUSES",
    "WORKER_STATUSES",
    "WORKER_TRANSITIONS",
    "WORKFLOW_STATUSES",
    "WORKFLOW_TRANSITIONS",
    "TaskStatus",
    "WorkerStatus",
    "WorkflowStatus",
    "check_task_transition",
    "check_worker_transition",
    "check_workflow_transition",
    "is_terminal",
]

WorkflowStatus = Literal[
    "pending", "running", "completed", "failed", "cancelled", "continued_as_new"
]
TaskStatus = Literal["pending", "claimed", "completed", "failed", "dead", "cancelled"]
WorkerStatus = Literal["active", "draining", "stopped", "lost"]

WORKFLOW_STATUSES: tuple[WorkflowStatus, ...] = get_args(WorkflowStatus)
TASK_STATUSES: tuple[TaskStatus, ...] = get_args(TaskStatus)
WORKER_STATUSES: tuple[WorkerStatus, ...] = get_args(WorkerStatus)

TERMINAL_WORKFLOW_STATUSES: frozenset[str] = frozenset(
    {"completed", "failed", "cancelled", "continued_as_new"}
)
# A dead task has ended: its workflow has been told. An operator's dead-letter requeue is the one
# way out, and it is a fresh start (new attempt count, new lease), hence the dead -> pending edge.
TERMINAL_TASK_STATUSES: frozenset[str] = frozenset({"completed", "failed", "dead", "cancelled"})

WORKFLOW_TRANSITIONS: Mapping[str, frozenset[str]] = {
    # pending -> a terminal status directly: cancelled before any worker picked it up, or the
    # first workflow task already completed or failed it.
    "pending": frozenset({"running", "completed", "failed", "cancelled", "continued_as_new"}),
    "running": frozenset({"completed", "failed", "cancelled", "continued_as_new"}),
    "completed": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
    # its workflow goes on in another run (continued_run_id)
    "continued_as_new": frozenset(),
}

TASK_TRANSITIONS: Mapping[str, frozenset[str]] = {
    # pending -> dead: schedule-to-start passed on the last attempt. pending -> failed is absent:
    # a task fails only after running.
    "pending": frozenset({"claimed", "dead", "cancelled"}),
    # claimed -> pending: retry after a failure or timeout, stale reclamation, worker drain.
    # claimed -> failed: a workflow task whose replay failed (no dead letter for those).
    "claimed": frozenset({"pending", "completed", "failed", "dead", "cancelled"}),
    "completed": frozenset(),
    "failed": frozenset(),
    "dead": frozenset({"pending"}),
    "cancelled": frozenset(),
}

WORKER_TRANSITIONS: Mapping[str, frozenset[str]] = {
    "active": frozenset({"draining", "stopped", "lost"}),
    "draining": frozenset({"stopped", "lost"}),
    # Re-registering under the same id (a restarted worker, or a lost one that comes back)
    # makes it active again.
    "stopped": frozenset({"active"}),
    "lost": frozenset({"active"}),
}

_WHY: Mapping[str, str] = {
    "completed": "it has already completed",
    "failed": "it has already failed",
    "cancelled": "it has already been cancelled",
    "continued_as_new": "it has continued as a new run",
    "dead": "it is in the dead-letter queue; requeue it first",
}


def _check(
    what: str,
    table: Mapping[str, frozenset[str]],
    terminal: frozenset[str],
    current: str,
    new: str,
    name: str | None,
) -> None:
    for status in (current, new):
        if status not in table:
            raise InvalidArgument(
                f"unknown {what} status {status!r}; expected one of {', '.join(table)}"
            )
    if current == new and current not in terminal:
        return
    if new in table[current]:
        return
    subject = f"{what} {name!r}" if name else what
    reason = _WHY.get(current) if current in terminal else None
    if reason is None:
        allowed = ", ".join(sorted(table[current])) or "nothing"
        reason = f"from {current!r} it can only become {allowed}"
    raise FailedPrecondition(f"{subject} cannot go from {current!r} to {new!r}: {reason}")


def check_workflow_transition(current: str, new: str, *, name: str | None = None) -> None:
    """Refuse an illegal change of a workflow run's status.

    Args:
        current: the run's status now.
        new: the status to write.
        name: the workflow id, to name it in the message.

    Raises:
        FailedPrecondition: the change is not allowed (the message says why).
        InvalidArgument: either status is not a workflow status.
    """
    _check("workflow", WORKFLOW_TRANSITIONS, TERMINAL_WORKFLOW_STATUSES, current, new, name)


def check_task_transition(current: str, new: str, *, name: str | None = None) -> None:
    """Refuse an illegal change of a task's status.

    Args:
        current: the task's status now.
        new: the status to write.
        name: the task id, to name it in the message.

    Raises:
        FailedPrecondition: the change is not allowed (the message says why).
        InvalidArgument: either status is not a task status.
    """
    _check("task", TASK_TRANSITIONS, TERMINAL_TASK_STATUSES, current, new, name)


def check_worker_transition(current: str, new: str, *, name: str | None = None) -> None:
    """Refuse an illegal change of a worker's status.

    Args:
        current: the worker's status now.
        new: the status to write.
        name: the worker id, to name it in the message.

    Raises:
        FailedPrecondition: the change is not allowed (the message says why).
        InvalidArgument: either status is not a worker status.
    """
    _check("worker", WORKER_TRANSITIONS, frozenset(), current, new, name)


def is_terminal(status: str) -> bool:
    """Return whether a workflow or task status is final.

    ``dead`` counts as final (the task has ended and its workflow was told), although an
    operator may requeue it. Worker statuses are not accepted: a stopped or lost worker may
    register again.

    Args:
        status: a workflow or task status.

    Returns:
        True for ``completed``, ``failed``, ``cancelled`` and ``dead``.

    Raises:
        InvalidArgument: ``status`` is neither a workflow nor a task status.
    """
    if status not in WORKFLOW_TRANSITIONS and status not in TASK_TRANSITIONS:
        raise InvalidArgument(
            f"unknown status {status!r}; expected a workflow or task status "
            f"({', '.join(sorted(set(WORKFLOW_STATUSES) | set(TASK_STATUSES)))})"
        )
    return status in TERMINAL_TASK_STATUSES or status in TERMINAL_WORKFLOW_STATUSES
