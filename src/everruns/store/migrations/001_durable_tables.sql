-- The seven tables of the operator guide, with the columns its runbook reads, plus what the
-- engine needs (runs, leases, timers, results). Payloads use the `json` type: PostgreSQL keeps
-- `json` as the exact text it was given, so key order, number spelling and precision survive.

CREATE SEQUENCE durable_lease_tokens;

CREATE TABLE durable_workflow_instances (
    id                  uuid PRIMARY KEY,                     -- the run id
    workflow_id         text NOT NULL CHECK (length(workflow_id) BETWEEN 1 AND 512),
    workflow_type       text NOT NULL CHECK (length(workflow_type) BETWEEN 1 AND 512),
    status              text NOT NULL DEFAULT 'pending'
                        CHECK (status IN ('pending', 'running', 'completed', 'failed', 'cancelled')),
    input               json NOT NULL,
    result              json,
    error               json,
    parent_run_id       uuid REFERENCES durable_workflow_instances (id) ON DELETE SET NULL,
    parent_child_id     text,
    partition_key       text NOT NULL,                        -- = workflow_id (sharding key)
    last_sequence_num   integer NOT NULL DEFAULT 0 CHECK (last_sequence_num >= 0),
    cancel_requested_at timestamptz,
    stuck_reason        text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    started_at          timestamptz,
    completed_at        timestamptz,
    -- a result only on completion, an error only on failure, an end time exactly when ended
    CHECK ((status = 'completed') = (result IS NOT NULL)),
    CHECK (status = 'failed' OR error IS NULL),
    CHECK ((status IN ('completed', 'failed', 'cancelled')) = (completed_at IS NOT NULL)),
    CHECK ((parent_run_id IS NULL) = (parent_child_id IS NULL))
);
-- one open run per workflow id: what makes start idempotent
CREATE UNIQUE INDEX durable_workflow_instances_open_id
    ON durable_workflow_instances (workflow_id) WHERE status IN ('pending', 'running');
CREATE INDEX durable_workflow_instances_by_id ON durable_workflow_instances (workflow_id, created_at DESC);
CREATE INDEX durable_workflow_instances_listing ON durable_workflow_instances (created_at DESC, id);
CREATE INDEX durable_workflow_instances_ended
    ON durable_workflow_instances (completed_at) WHERE completed_at IS NOT NULL;

CREATE TABLE durable_workflow_events (
    id            bigserial PRIMARY KEY,
    run_id        uuid NOT NULL REFERENCES durable_workflow_instances (id) ON DELETE CASCADE,
    workflow_id   text NOT NULL,
    sequence_num  integer NOT NULL CHECK (sequence_num >= 1),
    event_type    text NOT NULL CHECK (length(event_type) > 0),
    payload       json NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (run_id, sequence_num)
);

CREATE TABLE durable_task_queue (
    id                    uuid PRIMARY KEY,
    run_id                uuid NOT NULL REFERENCES durable_workflow_instances (id) ON DELETE CASCADE,
    workflow_id           text NOT NULL,
    kind                  text NOT NULL CHECK (kind IN ('workflow', 'activity')),
    activity_type         text NOT NULL CHECK (length(activity_type) BETWEEN 1 AND 512),
    activity_id           text,
    input                 json NOT NULL DEFAULT 'null',
    status                text NOT NULL DEFAULT 'pending'
                          CHECK (status IN ('pending', 'claimed', 'completed', 'failed', 'dead', 'cancelled')),
    attempt               integer NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    max_attempts          integer NOT NULL DEFAULT 5 CHECK (max_attempts >= 1),
    priority              integer NOT NULL DEFAULT 0,
    visible_at            timestamptz NOT NULL DEFAULT now(),
    claimed_by            text,
    claimed_at            timestamptz,
    heartbeat_at          timestamptz,
    lease_token           bigint,
    retry_policy          json NOT NULL DEFAULT '{}',
    schedule_to_start_s   double precision CHECK (schedule_to_start_s > 0),
    start_to_close_s      double precision CHECK (start_to_close_s > 0),
    heartbeat_timeout_s   double precision CHECK (heartbeat_timeout_s > 0),
    heartbeat_details     json,
    result                json,
    last_error            json,
    error_history         json NOT NULL DEFAULT '[]',
    breaker_key           text,
    cancel_requested_at   timestamptz,
    requeue_count         integer NOT NULL DEFAULT 0 CHECK (requeue_count >= 0),
    partition_key         text NOT NULL,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    completed_at          timestamptz,
    -- a claimed task always has a holder, a lease and a heartbeat; an unclaimed one has none
    CHECK ((status = 'claimed') = (claimed_by IS NOT NULL)),
    CHECK (status <> 'claimed' OR (lease_token IS NOT NULL AND heartbeat_at IS NOT NULL AND claimed_at IS NOT NULL)),
    CHECK ((kind = 'activity') = (activity_id IS NOT NULL)),
    CHECK (attempt <= max_attempts)
);
-- unique activity id per workflow run
CREATE UNIQUE INDEX durable_task_queue_activity_id
    ON durable_task_queue (run_id, activity_id) WHERE kind = 'activity';
-- at most one pending workflow task per run (a second may be claimed meanwhile)
CREATE UNIQUE INDEX durable_task_queue_one_pending_workflow_task
    ON durable_task_queue (run_id) WHERE kind = 'workflow' AND status = 'pending';
-- the claim predicate, exactly: pending tasks by type, then priority, then visibility
CREATE INDEX durable_task_queue_claim
    ON durable_task_queue (kind, activity_type, priority DESC, visible_at) WHERE status = 'pending';
-- the reclaim predicate, exactly
CREATE INDEX durable_task_queue_reclaim
    ON durable_task_queue (heartbeat_at) WHERE status = 'claimed';
CREATE INDEX durable_task_queue_by_holder
    ON durable_task_queue (claimed_by) WHERE status = 'claimed';
CREATE INDEX durable_task_queue_by_run ON durable_task_queue (run_id, kind, status);
-- delayed tasks (retry backoff): when the next one becomes visible
CREATE INDEX durable_task_queue_delayed ON durable_task_queue (visible_at) WHERE status = 'pending';

CREATE TABLE durable_dead_letter_queue (
    id                uuid PRIMARY KEY,
    task_id           uuid NOT NULL REFERENCES durable_task_queue (id) ON DELETE CASCADE,
    run_id            uuid NOT NULL REFERENCES durable_workflow_instances (id) ON DELETE CASCADE,
    workflow_id       text NOT NULL,
    activity_type     text NOT NULL,
    input             json NOT NULL,
    attempts          integer NOT NULL CHECK (attempts >= 0),
    last_error        text NOT NULL,
    error_history     json NOT NULL DEFAULT '[]',
    dead_at           timestamptz NOT NULL DEFAULT now(),
    requeued_at       timestamptz,                            -- set by an operator (runbook SQL)
    requeue_applied_at timestamptz,                           -- set by the control plane
    partition_key     text NOT NULL,
    CHECK (requeue_applied_at IS NULL OR requeued_at IS NOT NULL)
);
CREATE INDEX durable_dead_letter_queue_dead_at ON durable_dead_letter_queue (dead_at DESC);
-- requeues written by the runbook's UPDATE and not yet applied
CREATE INDEX durable_dead_letter_queue_requeue
    ON durable_dead_letter_queue (requeued_at) WHERE requeued_at IS NOT NULL AND requeue_applied_at IS NULL;

-- An operator's runbook UPDATE (SET requeued_at = NOW()) wakes the control plane at once.
CREATE FUNCTION durable_dead_letter_requeued() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('everruns_timers', 'requeue');
    RETURN NULL;
END $$;
CREATE TRIGGER durable_dead_letter_requeued
    AFTER UPDATE OF requeued_at ON durable_dead_letter_queue
    FOR EACH ROW WHEN (NEW.requeued_at IS NOT NULL AND NEW.requeue_applied_at IS NULL)
    EXECUTE FUNCTION durable_dead_letter_requeued();

CREATE TABLE durable_workers (
    id                 text PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 256),
    status             text NOT NULL DEFAULT 'active'
                       CHECK (status IN ('active', 'draining', 'stopped', 'lost')),
    activity_types     text[] NOT NULL DEFAULT '{}',
    workflow_types     text[] NOT NULL DEFAULT '{}',
    max_concurrency    integer NOT NULL CHECK (max_concurrency >= 1),
    current_load       integer NOT NULL DEFAULT 0 CHECK (current_load >= 0),
    host               text NOT NULL DEFAULT '',
    pid                integer,
    version            text NOT NULL DEFAULT '',
    started_at         timestamptz NOT NULL DEFAULT now(),
    last_heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    stopped_at         timestamptz,
    CHECK ((status IN ('stopped', 'lost')) = (stopped_at IS NOT NULL))
);
CREATE INDEX durable_workers_heartbeat ON durable_workers (last_heartbeat_at) WHERE status IN ('active', 'draining');

CREATE TABLE durable_signals (
    id            bigserial PRIMARY KEY,                    -- arrival order
    run_id        uuid NOT NULL REFERENCES durable_workflow_instances (id) ON DELETE CASCADE,
    workflow_id   text NOT NULL,
    signal_type   text NOT NULL DEFAULT 'custom' CHECK (signal_type IN ('custom', 'cancel')),
    signal_name   text NOT NULL CHECK (length(signal_name) BETWEEN 1 AND 512),
    payload       json NOT NULL DEFAULT 'null',
    created_at    timestamptz NOT NULL DEFAULT now(),
    processed_at  timestamptz
);
CREATE INDEX durable_signals_unprocessed ON durable_signals (run_id, id) WHERE processed_at IS NULL;

CREATE TABLE durable_circuit_breaker_state (
    key                 text PRIMARY KEY CHECK (length(key) BETWEEN 1 AND 512),
    state               text NOT NULL DEFAULT 'closed' CHECK (state IN ('closed', 'open', 'half_open')),
    failure_count       integer NOT NULL DEFAULT 0 CHECK (failure_count >= 0),
    success_count       integer NOT NULL DEFAULT 0 CHECK (success_count >= 0),
    probes_in_flight    integer NOT NULL DEFAULT 0 CHECK (probes_in_flight >= 0),
    window_started_at   timestamptz,
    opened_at           timestamptz,
    last_failure_at     timestamptz,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CHECK ((state = 'closed') = (opened_at IS NULL))
);

CREATE TABLE durable_timers (
    id            bigserial PRIMARY KEY,
    run_id        uuid NOT NULL REFERENCES durable_workflow_instances (id) ON DELETE CASCADE,
    workflow_id   text NOT NULL,
    timer_id      text NOT NULL,
    fire_at       timestamptz NOT NULL,
    status        text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'fired', 'cancelled')),
    partition_key text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (run_id, timer_id)
);
CREATE INDEX durable_timers_due ON durable_timers (fire_at) WHERE status = 'pending';
