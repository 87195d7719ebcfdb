"""Rows as attrs values, built by named constructors (`from_row`).

Payload columns stay exact JSON text here (the wire carries the same bytes); error objects are
decoded to dicts because the engine reads them. The storage format does not leak past these.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any, NamedTuple

import attrs

from everruns.domain.breaker import BreakerState

__all__ = [
    "BreakerRecord",
    "DeadLetter",
    "DueTimer",
    "Incarnation",
    "ScheduleDefinition",
    "ScheduleRecord",
    "Signal",
    "StoredEvent",
    "Task",
    "WorkerRecord",
    "WorkerRegistration",
    "WorkflowRun",
]

Row = Mapping[str, Any]


def _obj(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    return {} if text == "{}" else dict(json.loads(text))  # '{}': a workflow task's retry policy


def _list(text: str | None) -> list[Any]:
    return [] if text is None or text == "[]" else list(json.loads(text))


@attrs.frozen
class WorkflowRun:
    run_id: uuid.UUID
    workflow_id: str
    workflow_type: str
    status: str
    input: str
    result: str | None
    error: dict[str, Any] | None
    parent_run_id: uuid.UUID | None
    parent_child_id: str | None
    last_sequence_num: int
    cancel_requested_at: datetime | None
    stuck_reason: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    continued_run_id: uuid.UUID | None = None  # ended continued_as_new: the run it goes on in

    @property
    def is_open(self) -> bool:
        return self.status in ("pending", "running")

    @classmethod
    def from_row(cls, row: Row) -> WorkflowRun:
        return cls(
            run_id=row["id"],
            workflow_id=row["workflow_id"],
            workflow_type=row["workflow_type"],
            status=row["status"],
            input=row["input"],
            result=row["result"],
            error=_obj(row["error"]),
            parent_run_id=row["parent_run_id"],
            parent_child_id=row["parent_child_id"],
            last_sequence_num=row["last_sequence_num"],
            cancel_requested_at=row["cancel_requested_at"],
            stuck_reason=row["stuck_reason"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            started_at=row["started_at"],
            completed_at=row["completed_at"],
            continued_run_id=row.get("continued_run_id"),
        )


@attrs.frozen
class StoredEvent:
    sequence_num: int
    type: str
    payload: str  # the whole event object as JSON text
    created_at: datetime

    @property
    def data(self) -> dict[str, Any]:
        return dict(json.loads(self.payload))

    @classmethod
    def from_row(cls, row: Row) -> StoredEvent:
        return cls(row["sequence_num"], row["event_type"], row["payload"], row["created_at"])


class TaskRef(NamedTuple):
    """A claim of a task as a reply handed it out: enough to give it back (`Store.unclaim`)."""

    task_id: uuid.UUID
    lease_token: int | None
    kind: str
    type_name: str  # activity type, or workflow type for workflow tasks


@attrs.frozen
class Task:
    task_id: uuid.UUID
    run_id: uuid.UUID
    workflow_id: str
    kind: str
    type_name: str  # activity type, or workflow type for workflow tasks
    activity_id: str | None
    input: str
    status: str
    attempt: int
    max_attempts: int
    priority: int
    visible_at: datetime
    claimed_by: str | None
    claimed_at: datetime | None
    heartbeat_at: datetime | None
    lease_token: int | None
    retry_policy: dict[str, Any]
    schedule_to_start_s: float | None
    start_to_close_s: float | None
    heartbeat_timeout_s: float | None
    heartbeat_details: str | None
    result: str | None
    last_error: dict[str, Any] | None
    error_history: list[Any]
    breaker_key: str | None
    cancel_requested_at: datetime | None
    created_at: datetime
    completed_at: datetime | None
    requeue_count: int = 0

    @property
    def effective_breaker_key(self) -> str:
        return self.breaker_key or self.type_name

    @property
    def may_be_probe(self) -> bool:
        """A claimed activity: it may be a half-open breaker's probe, whose slot its release
        frees (`Store.release_probe`), so that release writes its breaker."""
        return self.kind == "activity" and self.claimed_at is not None

    @classmethod
    def from_row(cls, row: Row) -> Task:
        return cls(
            task_id=row["id"],
            run_id=row["run_id"],
            workflow_id=row["workflow_id"],
            kind=row["kind"],
            type_name=row["activity_type"],
            activity_id=row["activity_id"],
            input=row["input"],
            status=row["status"],
            attempt=row["attempt"],
            max_attempts=row["max_attempts"],
            priority=row["priority"],
            visible_at=row["visible_at"],
            claimed_by=row["claimed_by"],
            claimed_at=row["claimed_at"],
            heartbeat_at=row["heartbeat_at"],
            lease_token=row["lease_token"],
            retry_policy=_obj(row["retry_policy"]) or {},
            schedule_to_start_s=row["schedule_to_start_s"],
            start_to_close_s=row["start_to_close_s"],
            heartbeat_timeout_s=row["heartbeat_timeout_s"],
            heartbeat_details=row["heartbeat_details"],
            result=row["result"],
            last_error=_obj(row["last_error"]),
            error_history=_list(row["error_history"]),
            breaker_key=row["breaker_key"],
            cancel_requested_at=row["cancel_requested_at"],
            created_at=row["created_at"],
            completed_at=row["completed_at"],
            requeue_count=row["requeue_count"],
        )


@attrs.frozen
class DeadLetter:
    id: uuid.UUID
    task_id: uuid.UUID
    run_id: uuid.UUID
    workflow_id: str
    activity_type: str
    input: str
    attempts: int
    last_error: str
    error_history: list[Any]
    dead_at: datetime
    requeued_at: datetime | None
    requeue_applied_at: datetime | None

    @classmethod
    def from_row(cls, row: Row) -> DeadLetter:
        return cls(
            id=row["id"],
            task_id=row["task_id"],
            run_id=row["run_id"],
            workflow_id=row["workflow_id"],
            activity_type=row["activity_type"],
            input=row["input"],
            attempts=row["attempts"],
            last_error=row["last_error"],
            error_history=_list(row["error_history"]),
            dead_at=row["dead_at"],
            requeued_at=row["requeued_at"],
            requeue_applied_at=row["requeue_applied_at"],
        )


@attrs.frozen
class BreakerRecord:
    """A circuit breaker's row as operators see it: its state, and when the row last changed
    (``updated_at``: a state change, a failure or probe success counted, a probe handed out or
    freed)."""

    breaker: BreakerState
    updated_at: datetime

    @classmethod
    def from_row(cls, row: Row) -> BreakerRecord:
        return cls(
            breaker=BreakerState(
                key=row["key"],
                state=row["state"],
                failure_count=row["failure_count"],
                success_count=row["success_count"],
                probes_in_flight=row["probes_in_flight"],
                window_started_at=row["window_started_at"],
                opened_at=row["opened_at"],
                last_failure_at=row["last_failure_at"],
                recent_failures=tuple(row["recent_failures"] or ()),
            ),
            updated_at=row["updated_at"],
        )


class ScheduleDefinition(NamedTuple):
    """What a schedule starts and when: the fields a create sets and compares (whether it is
    paused is its state, not its definition)."""

    spec: str  # normalized (`everruns.domain.cron.Spec.text`)
    workflow_type: str
    input: str  # exact JSON text
    overlap: str  # 'skip': no firing while the last run is open; 'allow'


@attrs.frozen
class ScheduleRecord:
    """A schedule's row: what it starts, when, and what it did so far."""

    schedule_id: str
    spec: str
    workflow_type: str
    input: str
    overlap: str
    paused: bool
    paused_reason: str | None  # why the control plane paused it
    next_fire_at: datetime
    last_fired_at: datetime | None
    last_workflow_id: str | None
    last_run_id: uuid.UUID | None
    fired_count: int
    skipped_count: int
    created_at: datetime
    updated_at: datetime

    @property
    def definition(self) -> ScheduleDefinition:
        return ScheduleDefinition(self.spec, self.workflow_type, self.input, self.overlap)

    @classmethod
    def from_row(cls, row: Row) -> ScheduleRecord:
        return cls(
            schedule_id=row["id"],
            spec=row["spec"],
            workflow_type=row["workflow_type"],
            input=row["input"],
            overlap=row["overlap"],
            paused=row["paused"],
            paused_reason=row["paused_reason"],
            next_fire_at=row["next_fire_at"],
            last_fired_at=row["last_fired_at"],
            last_workflow_id=row["last_workflow_id"],
            last_run_id=row["last_run_id"],
            fired_count=row["fired_count"],
            skipped_count=row["skipped_count"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )


@attrs.frozen
class WorkerRecord:
    id: str
    status: str
    activity_types: tuple[str, ...]
    workflow_types: tuple[str, ...]
    max_concurrency: int
    current_load: int
    host: str
    pid: int | None
    version: str
    started_at: datetime
    last_heartbeat_at: datetime
    stopped_at: datetime | None

    @classmethod
    def from_row(cls, row: Row) -> WorkerRecord:
        return cls(
            id=row["id"],
            status=row["status"],
            activity_types=tuple(row["activity_types"]),
            workflow_types=tuple(row["workflow_types"]),
            max_concurrency=row["max_concurrency"],
            current_load=row["current_load"],
            host=row["host"],
            pid=row["pid"],
            version=row["version"],
            started_at=row["started_at"],
            last_heartbeat_at=row["last_heartbeat_at"],
            stopped_at=row["stopped_at"],
        )


@attrs.frozen
class Incarnation:
    """One run of a worker's process, as its connection names it: the token that run sent
    (`Worker.run` makes one), or, for a worker that sends none (an older release), the time of
    the registration current when its cancellation stream opened."""

    token: str | None
    registered_at: datetime | None

    def __attrs_post_init__(self) -> None:
        if (self.token is None) == (self.registered_at is None):
            raise ValueError("an incarnation is named by a token or by a registration time")

    @classmethod
    def of_token(cls, token: str) -> Incarnation:
        return cls(token=token, registered_at=None)

    @classmethod
    def registered(cls, at: datetime) -> Incarnation:
        return cls(token=None, registered_at=at)


@attrs.frozen
class WorkerRegistration:
    """A worker's current registration: its incarnation's token (None: registered by a worker
    that sends none, each registration an incarnation of its own) and when that incarnation
    first registered (``started_at``)."""

    incarnation: str | None
    started_at: datetime

    @classmethod
    def from_row(cls, row: Row) -> WorkerRegistration:
        return cls(incarnation=row["incarnation"], started_at=row["started_at"])

    def names(self, incarnation: Incarnation) -> bool:
        """Whether this registration is ``incarnation``'s: the same token, or, for a connection
        without one, the registration it found when its stream opened, itself made without a
        token (a tokened registration is another process's, even at that time)."""
        if incarnation.token is not None:
            return self.incarnation == incarnation.token
        return self.incarnation is None and self.started_at == incarnation.registered_at


@attrs.frozen
class DueTimer:
    """A pending timer whose time has come, as read (unlocked) to be fired."""

    id: int
    run_id: uuid.UUID
    timer_id: str
    fire_at: datetime

    @classmethod
    def from_row(cls, row: Row) -> DueTimer:
        return cls(
            id=row["id"], run_id=row["run_id"], timer_id=row["timer_id"], fire_at=row["fire_at"]
        )


@attrs.frozen
class Signal:
    id: int
    run_id: uuid.UUID
    workflow_id: str
    signal_type: str
    name: str
    payload: str
    created_at: datetime
    processed_at: datetime | None

    @classmethod
    def from_row(cls, row: Row) -> Signal:
        return cls(
            id=row["id"],
            run_id=row["run_id"],
            workflow_id=row["workflow_id"],
            signal_type=row["signal_type"],
            name=row["signal_name"],
            payload=row["payload"],
            created_at=row["created_at"],
            processed_at=row["processed_at"],
        )
