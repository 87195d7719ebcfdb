"""Every exception everruns raises on purpose, rooted at `EverrunsError`.

Foreign exceptions (asyncpg, grpclib, OSError, trio.TooSlowError) are mapped to these at the
edges and chained with ``raise ... from``; code outside the edges never sees them.

    EverrunsError
    ├── ConfigError                 bad environment variable or flag (exit code 2)
    ├── DatabaseError               PostgreSQL could not be reached or refused an operation
    │   ├── DatabaseUnavailable     no connection within the start-up budget
    │   ├── EmbeddedPostgresError   the embedded server could not be started or reused
    │   └── MigrationError          a migration failed, or an applied one was edited
    ├── StoreError                  a store operation was refused by the data
    │   ├── NotFound                no such workflow, task, dead letter or worker
    │   ├── AlreadyExists           a unique identity is taken
    │   ├── ConcurrencyConflict     optimistic concurrency: the history moved on
    │   ├── StaleLease              the lease token is not the task's current one
    │   ├── FailedPrecondition      the object is in a state that forbids the operation
    │   └── ResourceExhausted       a limit was reached (backpressure, payload size)
    ├── InvalidArgument             a request field is malformed
    ├── RpcError                    the control plane answered with an error status
    │   └── ServerUnavailable       no control plane answered
    │       └── ServerTimeout       it accepted the connection but did not answer in time
    ├── ClientClosed                a Client (or a handle of it) was used after its block ended
    ├── PayloadError                a value is not exact JSON (names the offending type)
    ├── WorkflowError               raised inside workflow code
    │   ├── ActivityError           an activity failed for good (after its retries)
    │   │   └── ActivityCancelled   an activity was cancelled
    │   ├── ChildWorkflowError      a child workflow failed
    │   ├── WorkflowCancelled       the workflow was asked to cancel
    │   ├── NonDeterminismError     replay disagrees with the recorded history
    │   └── IllegalAwait            workflow code awaited something that is not a ctx operation
    ├── WorkflowFailed              a client awaited a workflow that ended failed or cancelled
    ├── NonRetryableError           raise from an activity to fail it at once, without retries
    └── RetryAfter                  raise from an activity to retry it, not before a given delay

    ContinueAsNew (a BaseException)  raised by ctx.continue_as_new: the run ends, its workflow
                                     goes on in a new run
"""

from __future__ import annotations

from typing import Any


class EverrunsError(Exception):
    """Root of every exception everruns raises on purpose."""


class ConfigError(EverrunsError):
    """A configuration value is invalid; the message names the variable and what to do."""


class DatabaseError(EverrunsError):
    """PostgreSQL could not be used."""


class DatabaseUnavailable(DatabaseError):
    """PostgreSQL did not accept a connection within the start-up budget."""


class EmbeddedPostgresError(DatabaseError):
    """The embedded PostgreSQL could not be started, reused or stopped."""


class MigrationError(DatabaseError):
    """A migration failed, or a migration that was already applied has been edited."""


class StoreError(EverrunsError):
    """The store refused an operation because of the data it holds."""


class NotFound(StoreError):
    """The named object does not exist."""


class AlreadyExists(StoreError):
    """The identity is already taken."""


class ConcurrencyConflict(StoreError):
    """The event history moved on since the caller read it."""


class StaleLease(StoreError):
    """The lease token is not the task's current lease: another holder owns it now."""


class FailedPrecondition(StoreError):
    """The object is in a state that forbids the operation (e.g. the workflow has ended)."""


class ResourceExhausted(StoreError):
    """A limit was reached; retry later (backpressure) or send less (payload size)."""


class InvalidArgument(EverrunsError):
    """A request field is malformed; the message names the field."""


class RpcError(EverrunsError):
    """The control plane answered with an error status."""

    def __init__(self, message: str, *, status: str = "UNKNOWN") -> None:
        super().__init__(message)
        self.status = status


class ServerUnavailable(RpcError):
    """No control plane answered at the configured address."""


class ServerTimeout(ServerUnavailable):
    """The control plane accepted the connection but did not answer within the deadline: it is
    hung or overloaded, or the address is a silent listener that is not a control plane."""


class ClientClosed(EverrunsError, RuntimeError):
    """A `Client`, or a handle made by it, was used after its ``async with Client.connect()``
    block ended; open a new client."""


class PayloadError(EverrunsError, TypeError):
    """A value cannot be carried as exact JSON; the message names the offending type."""


class WorkflowError(EverrunsError):
    """Base of the exceptions workflow code can meet."""


class ActivityError(WorkflowError):
    """An activity failed for good: its retries are exhausted or the error was non-retryable.

    Attributes:
        activity_id: the command id of the activity in its workflow.
        activity_type: the activity's registered name.
        error_type: the type name of the exception the activity raised last.
        attempt: how many attempts were made.
    """

    def __init__(
        self,
        message: str,
        *,
        activity_id: str = "",
        activity_type: str = "",
        error_type: str = "",
        attempt: int = 0,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.activity_id = activity_id
        self.activity_type = activity_type
        self.error_type = error_type
        self.attempt = attempt
        self.details = details or {}


class ActivityCancelled(ActivityError):
    """The activity was cancelled before it finished."""


class ChildWorkflowError(WorkflowError):
    """A child workflow ended failed or cancelled."""

    def __init__(self, message: str, *, child_id: str = "", error_type: str = "") -> None:
        super().__init__(message)
        self.child_id = child_id
        self.error_type = error_type


class WorkflowCancelled(WorkflowError):
    """The workflow was asked to cancel; let it propagate to end the workflow `cancelled`."""


class NonDeterminismError(WorkflowError):
    """Replaying the workflow issued commands that differ from its recorded history."""


class IllegalAwait(WorkflowError):
    """Workflow code awaited something that is not a ctx operation."""


class WorkflowFailed(EverrunsError):
    """The awaited workflow ended `failed` or `cancelled`.

    Attributes:
        status: the final status (`failed` or `cancelled`).
        error: the recorded error object, if any.
    """

    def __init__(self, message: str, *, status: str, error: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error = error or {}


class NonRetryableError(EverrunsError):
    """Raise from an activity to fail it at once: no further attempts are made."""


class RetryAfter(EverrunsError):
    """Raise from an activity to have its next attempt wait at least ``seconds``.

    The attempt fails as any other does (it counts against ``max_attempts``, and a type the
    retry policy lists as non-retryable still fails at once), but the next one is not made
    before ``seconds`` have passed: the delay is the larger of ``seconds`` and the policy's
    backoff, and may exceed the policy's ``maximum_interval`` (a service that says when to
    come back is not asked earlier). For a rate limit's ``Retry-After``, say.

    Args:
        seconds: the least delay before the next attempt, a finite number from 0 to
            `everruns.domain.limits.MAX_SECONDS` (100 years).
        message: what went wrong, for the recorded error.

    Raises:
        InvalidArgument: ``seconds`` is not such a number.
    """

    def __init__(self, seconds: float, message: str = "") -> None:
        from everruns.domain.limits import MAX_SECONDS_TEXT, is_delay  # limits imports us

        if not is_delay(seconds):
            raise InvalidArgument(
                f"RetryAfter seconds must be a finite number from 0 to {MAX_SECONDS_TEXT}, "
                f"got {seconds!r}"
            )
        super().__init__(message or f"retry after {seconds:g} s")
        self.seconds = float(seconds)

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled (a process pool's worker raised it) and copied with both arguments: the
        # default would call RetryAfter(message).
        return (type(self), (self.seconds, str(self)), self.__dict__)


WORKER_SHUTDOWN_ERROR = "everruns.WorkerShutdown"
"""The error type of an activity attempt a stopping worker gives back when its grace period
ends: the control plane sends the task to another worker without charging the attempt."""

NOT_SERVED_ERROR = "everruns.NotServed"
"""The error type of a task a worker gives back because it does not serve its type (handed to
it by a control plane that remembered an older registration): the control plane puts it back
in the queue for another worker, without charging the attempt or failing the run."""


class ContinueAsNew(BaseException):
    """Raised by `WorkflowContext.continue_as_new`: this run ends and its workflow goes on in
    a new run of the same workflow id, started with ``input`` in the same transaction.

    A BaseException, so that an ``except Exception`` in workflow code does not stop it; let it
    propagate out of the workflow function.
    """

    def __init__(self, input: Any = None) -> None:
        super().__init__("the workflow continues as new")
        self.input = input
