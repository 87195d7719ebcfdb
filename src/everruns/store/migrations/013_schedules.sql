-- Schedules: a workflow started again and again at the times a cron expression (or an
-- `@every` interval) names. The control plane's due-scanner fires a due schedule in one
-- transaction that locks its row (SKIP LOCKED: several control planes fire each time once),
-- starts the run and moves next_fire_at on. The last run is named by id only: retention may
-- delete it. The CHECKs keep rows edited by hand within what the firing can use: names as the
-- runs table takes them, times Python's datetime holds (years 1970 to 9998: PostgreSQL's
-- range is far wider, and a row the control plane cannot read would stop every firing).
CREATE TABLE IF NOT EXISTS durable_schedules (
    -- a run's workflow id is the schedule id, '@' and the firing's UTC time (21 characters)
    id               text PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 491),
    spec             text NOT NULL CHECK (length(spec) BETWEEN 1 AND 200),
    workflow_type    text NOT NULL CHECK (length(workflow_type) BETWEEN 1 AND 512),
    input            json NOT NULL,
    overlap          text NOT NULL DEFAULT 'skip' CHECK (overlap IN ('skip', 'allow')),
    paused           boolean NOT NULL DEFAULT false,
    -- why the control plane paused it (a spec or a firing it could not use), until resumed
    paused_reason    text,
    next_fire_at     timestamptz NOT NULL
                     CHECK (next_fire_at >= '1970-01-01 00:00:00+00'
                            AND next_fire_at < '9999-01-01 00:00:00+00'),
    last_fired_at    timestamptz
                     CHECK (last_fired_at >= '1970-01-01 00:00:00+00'
                            AND last_fired_at < '9999-01-01 00:00:00+00'),
    last_workflow_id text,
    last_run_id      uuid,
    fired_count      bigint NOT NULL DEFAULT 0 CHECK (fired_count >= 0),
    skipped_count    bigint NOT NULL DEFAULT 0 CHECK (skipped_count >= 0),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
-- the due-scanner's look: the next firing of a schedule that is not paused
CREATE INDEX IF NOT EXISTS durable_schedules_due ON durable_schedules (next_fire_at)
    WHERE NOT paused;
