-- Every SQL statement of everruns, as named blocks. Each block starts with `-- name: NAME`,
-- then one `--` line saying what it does. Loaded once by everruns.store.queries.
-- Time always comes from the database (now()), so several control planes agree on it.
--
-- Rows found by their key (a task, a run, a timer by id or by run) state their other
-- conditions in a form no partial index's predicate follows from: a claimed task as
-- `claimed_by IS NOT NULL`, an open run as `completed_at IS NULL`, a live worker as
-- `stopped_at IS NULL` (CHECK constraints make each the same rows as its status), a pending run
-- as `started_at IS NULL AND completed_at IS NULL` (every statement that makes a run running
-- sets started_at), a pending task as `status IN ('pending', 'claimed') AND claimed_by IS
-- NULL`, a pending timer as `status NOT IN ('fired', 'cancelled')`. With statistics taken while
-- few rows were live, a partial index over the live ones (claimed tasks, open runs...) looks
-- empty, and PostgreSQL reads it whole to find the one row instead of using the key: the
-- statement recording ten results took 14.8 ms instead of 2.0 ms with 5,000 tasks claimed.
-- tests/integration/test_engine.py checks every statement of a workflow's life for it.

-- name: insert_workflow
-- Create a run unless the workflow id already has an open one (then return nothing).
INSERT INTO durable_workflow_instances (id, workflow_id, workflow_type, input, partition_key,
                                        parent_run_id, parent_child_id)
VALUES ($1, $2, $3, $4::json, $2, $5, $6)
ON CONFLICT (workflow_id) WHERE status IN ('pending', 'running') DO NOTHING
RETURNING *;

-- name: get_open_run
-- The open run of a workflow id, if any.
SELECT * FROM durable_workflow_instances
WHERE workflow_id = $1 AND status IN ('pending', 'running');

-- name: get_run
-- One run by its run id.
SELECT * FROM durable_workflow_instances WHERE id = $1;

-- name: get_latest_run
-- The newest run of a workflow id.
SELECT * FROM durable_workflow_instances WHERE workflow_id = $1
ORDER BY created_at DESC, id DESC LIMIT 1;

-- name: retry_stuck_runs
-- Give the open runs marked stuck whose workflow type is in $1 another try: a pending workflow
-- task for each that has none out (at most $2 runs). Run rows another transaction holds are
-- skipped, never waited for (the next registration, stop or loss of a worker of the type
-- looks again), and locked newest first, as every statement that holds several does. One
-- NOTIFY per type. Returns the run ids.
WITH stuck AS (
    -- Those with a workflow task out are left out before the limit: runs retried by an
    -- earlier registration, their tasks still queued, must not take the places of the rest.
    SELECT r.id, r.workflow_id, r.workflow_type FROM durable_workflow_instances r
    WHERE r.stuck_reason IS NOT NULL AND r.status IN ('pending', 'running')
      AND r.workflow_type = ANY($1::text[])
      AND NOT EXISTS (SELECT 1 FROM durable_task_queue w
                      WHERE w.run_id = r.id AND w.kind = 'workflow'
                        AND w.status IN ('pending', 'claimed'))
    ORDER BY r.created_at DESC, r.id
    LIMIT $2
    FOR UPDATE OF r SKIP LOCKED
), wft AS (
    INSERT INTO durable_task_queue (id, run_id, workflow_id, kind, activity_type, max_attempts,
                                    partition_key)
    SELECT gen_random_uuid(), stuck.id, stuck.workflow_id, 'workflow', stuck.workflow_type,
           2147483647, stuck.workflow_id
    FROM stuck
    ON CONFLICT (run_id) WHERE kind = 'workflow' AND status = 'pending' DO NOTHING
    RETURNING run_id, activity_type
), woke AS (
    SELECT count(*) AS n FROM (
        SELECT pg_notify('everruns_tasks', 'workflow:' || t || E'\t' || n)
        FROM (SELECT activity_type AS t, count(*) AS n FROM wft GROUP BY activity_type) d) x
)
SELECT wft.run_id FROM wft WHERE (SELECT n FROM woke) IS NOT NULL;

-- name: lock_run
-- Lock a run's row: the per-run mutex every history append takes.
SELECT * FROM durable_workflow_instances WHERE id = $1 FOR UPDATE;

-- name: list_workflows
-- Runs newest first, optionally filtered by type and status, keyset-paged by (created_at, id).
SELECT * FROM durable_workflow_instances
WHERE ($1::text IS NULL OR workflow_type = $1)
  AND ($2::text IS NULL OR status = $2)
  AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4::uuid))
ORDER BY created_at DESC, id DESC
LIMIT $5;

-- name: set_run_running
-- A worker picked the run up: pending becomes running (ended runs are left alone).
UPDATE durable_workflow_instances
SET status = 'running', started_at = coalesce(started_at, now()), updated_at = now()
WHERE id = $1 AND completed_at IS NULL
RETURNING *;

-- name: end_run
-- Record a run's end: status completed/failed/cancelled with its result or error (an ended run
-- is not stuck).
UPDATE durable_workflow_instances
SET status = $2, result = $3::json, error = $4::json, completed_at = now(), updated_at = now(),
    stuck_reason = NULL
WHERE id = $1 AND completed_at IS NULL
RETURNING *;

-- name: set_continued
-- The run a run that ended continued_as_new goes on in (written in the transaction that ended
-- it and started that one).
UPDATE durable_workflow_instances SET continued_run_id = $2
WHERE id = $1 AND status = 'continued_as_new';

-- name: set_run_stuck
-- Mark an open run as stuck (non-determinism): it stays visible and is not retried in a loop
-- (retry_stuck_runs gives it another try when a worker serving its type registers). Applying
-- a workflow task's decision, or ending the run, clears the mark.
UPDATE durable_workflow_instances SET stuck_reason = $2, updated_at = now()
WHERE id = $1 AND completed_at IS NULL;

-- name: set_cancel_requested
-- Remember that cancellation was requested (idempotent). The time is the clock's under the run's
-- lock, not the transaction's start: every child the run started before is older, every child
-- it starts afterwards (having seen the request) newer (find_orphaned_children tells them apart).
UPDATE durable_workflow_instances
SET cancel_requested_at = coalesce(cancel_requested_at, clock_timestamp()), updated_at = now()
WHERE id = $1
RETURNING cancel_requested_at;

-- name: reserve_sequence_if
-- Optimistic append: reserve $3 sequence numbers only if the history ends at $2 now.
UPDATE durable_workflow_instances
SET last_sequence_num = last_sequence_num + $3, updated_at = now()
WHERE id = $1 AND last_sequence_num = $2
RETURNING last_sequence_num;

-- name: reserve_sequence
-- Reserve $2 sequence numbers at the end of a run's history (caller holds the run lock).
UPDATE durable_workflow_instances
SET last_sequence_num = last_sequence_num + $2, updated_at = now()
WHERE id = $1
RETURNING last_sequence_num;

-- name: insert_events
-- Insert events given as parallel arrays of sequence numbers, types and JSON texts.
INSERT INTO durable_workflow_events (run_id, workflow_id, sequence_num, event_type, payload)
SELECT $1, $2, s, t, p::json
FROM unnest($3::int[], $4::text[], $5::text[]) AS e(s, t, p);

-- name: load_events
-- A run's events after a sequence number, in order.
SELECT sequence_num, event_type, payload::text AS payload, created_at
FROM durable_workflow_events
WHERE run_id = $1 AND sequence_num > $2
ORDER BY sequence_num
LIMIT $3;

-- name: insert_task
-- Enqueue a task (workflow or activity).
INSERT INTO durable_task_queue (id, run_id, workflow_id, kind, activity_type, activity_id, input,
    max_attempts, priority, visible_at, retry_policy, schedule_to_start_s, start_to_close_s,
    heartbeat_timeout_s, breaker_key, partition_key, start_deadline)
VALUES ($1, $2, $3, $4, $5, $6, $7::json, $8, $9, coalesce($10, now()), $11::json, $12, $13, $14,
        $15, $3, coalesce($10, now()) + make_interval(secs => $12))
RETURNING *;

-- name: ensure_workflow_task
-- Make sure the run has one pending workflow task; returns a row only if one was created.
INSERT INTO durable_task_queue (id, run_id, workflow_id, kind, activity_type, max_attempts,
                                partition_key)
VALUES ($1, $2, $3, 'workflow', $4, 2147483647, $3)
ON CONFLICT (run_id) WHERE kind = 'workflow' AND status = 'pending' DO NOTHING
RETURNING id;

-- name: claim_tasks
-- Claim up to $4 visible pending tasks of the served types, skipping locked rows and tasks
-- whose circuit breaker key is in $5; every claim draws a fresh lease token.
WITH picked AS (
    SELECT id FROM durable_task_queue
    WHERE status = 'pending' AND visible_at <= now()
      AND ((kind = 'workflow' AND activity_type = ANY($2::text[]))
        OR (kind = 'activity' AND activity_type = ANY($3::text[])
            AND NOT (coalesce(breaker_key, activity_type) = ANY($5::text[]))))
    ORDER BY priority DESC, visible_at
    LIMIT $4
    FOR UPDATE SKIP LOCKED
)
UPDATE durable_task_queue t
SET status = 'claimed', claimed_by = $1, claimed_at = now(), heartbeat_at = now(),
    attempt = t.attempt + 1, lease_token = nextval('durable_lease_tokens'), updated_at = now()
FROM picked WHERE t.id = picked.id
  -- looked up by key, as in claim_tasks_fast
  AND t.id = ANY(ARRAY(SELECT id FROM picked))
RETURNING t.*;

-- name: heartbeat_task
-- Refresh a claimed task's heartbeat if the caller holds its current lease.
UPDATE durable_task_queue
SET heartbeat_at = now(), heartbeat_details = coalesce($3::json, heartbeat_details)
WHERE id = $1 AND lease_token = $2 AND claimed_by IS NOT NULL
RETURNING cancel_requested_at;

-- name: lock_task_lease
-- Lock a claimed task if the caller holds its current lease.
SELECT * FROM durable_task_queue
WHERE id = $1 AND lease_token = $2 AND claimed_by IS NOT NULL
FOR UPDATE;

-- name: get_task
-- One task by id.
SELECT * FROM durable_task_queue WHERE id = $1;

-- name: retry_task
-- Put a failed attempt back in the queue after a delay, keeping its error; a task whose
-- cancellation was requested (by its workflow, or because its run ended) is cancelled instead
-- (every failure of such a task comes here, its last attempt's too: it is never dead-lettered).
UPDATE durable_task_queue
SET status = CASE WHEN cancel_requested_at IS NULL THEN 'pending' ELSE 'cancelled' END,
    claimed_by = NULL, claimed_at = NULL, heartbeat_at = NULL,
    completed_at = CASE WHEN cancel_requested_at IS NOT NULL THEN now() END,
    visible_at = now() + make_interval(secs => $2),
    start_deadline = now() + make_interval(secs => $2)
                   + make_interval(secs => schedule_to_start_s),
    last_error = $3::json,
    error_history = (error_history::jsonb || jsonb_build_array($3::jsonb))::json, updated_at = now()
WHERE id = $1
RETURNING *;

-- name: kill_task
-- Mark a task dead (attempts exhausted or non-retryable), keeping its error.
UPDATE durable_task_queue
SET status = 'dead', claimed_by = NULL, last_error = $2::json,
    error_history = (error_history::jsonb || jsonb_build_array($2::jsonb))::json,
    completed_at = now(), updated_at = now()
WHERE id = $1
RETURNING *;

-- name: cancel_task
-- Close a task as cancelled.
UPDATE durable_task_queue
SET status = 'cancelled', claimed_by = NULL, completed_at = now(), updated_at = now()
WHERE id = $1 AND status IN ('pending', 'claimed')
RETURNING *;

-- name: insert_dead_letter
-- Record a dead task in the dead-letter queue (same transaction that kills it).
INSERT INTO durable_dead_letter_queue (id, task_id, run_id, workflow_id, activity_type, input,
                                       attempts, last_error, error_history, partition_key)
SELECT $1, t.id, t.run_id, t.workflow_id, t.activity_type, t.input, t.attempt, $3,
       t.error_history, t.workflow_id
FROM durable_task_queue t WHERE t.id = $2
RETURNING *;

-- name: list_dead_letters
-- Dead letters, newest first, keyset-paged by (dead_at, id).
SELECT * FROM durable_dead_letter_queue
WHERE ($1::timestamptz IS NULL OR (dead_at, id) < ($1, $2::uuid))
ORDER BY dead_at DESC, id DESC
LIMIT $3;

-- name: mark_requeue
-- Requeue a dead letter (RPC/CLI path): stamp both columns, once.
UPDATE durable_dead_letter_queue
SET requeued_at = coalesce(requeued_at, now()), requeue_applied_at = now()
WHERE id = $1 AND requeue_applied_at IS NULL
RETURNING *;

-- name: get_dead_letter
-- One dead letter by id.
SELECT * FROM durable_dead_letter_queue WHERE id = $1;

-- name: claim_operator_requeues
-- Requeues written by an operator's UPDATE ... SET requeued_at and not applied yet. Their runs
-- are locked first (key share), then the dead letters, in the order retention takes them (the
-- run, then by cascade its dead letters), so the two never deadlock; a run another
-- transaction holds (retention deleting it, say) is skipped, its requeue left for a later round.
WITH wanted AS MATERIALIZED (
    SELECT id, run_id FROM durable_dead_letter_queue
    WHERE requeued_at IS NOT NULL AND requeue_applied_at IS NULL
    ORDER BY requeued_at LIMIT $1
), runs AS MATERIALIZED (
    SELECT r.id FROM durable_workflow_instances r
    WHERE r.id = ANY(ARRAY(SELECT run_id FROM wanted))
    FOR KEY SHARE SKIP LOCKED
)
UPDATE durable_dead_letter_queue d
SET requeue_applied_at = now()
FROM (SELECT id FROM durable_dead_letter_queue
      WHERE id = ANY(ARRAY(SELECT w.id FROM wanted w JOIN runs ON runs.id = w.run_id))
        AND requeued_at IS NOT NULL AND requeue_applied_at IS NULL
      FOR UPDATE SKIP LOCKED) r
WHERE d.id = r.id
RETURNING d.*;

-- name: lock_run_of_dead_letter
-- A requeue locks the dead letter's run first (key share), before the dead letter's row: in
-- the order retention takes them (the run, then by cascade its dead letters), so the two never
-- deadlock. No row: no such dead letter, or its run is gone.
SELECT r.id FROM durable_dead_letter_queue d
JOIN durable_workflow_instances r ON r.id = d.run_id
WHERE d.id = $1
FOR KEY SHARE OF r;

-- name: revive_task
-- Put a dead task back in the queue with fresh attempts: an activity's budget is its retry
-- policy's again ($2 when the policy names none, as when it was enqueued), not what its last
-- life ended with (a graceful drain's release adds one). Its run is locked (key share): a
-- retention round skips a locked run, and one that locked it first has deleted it (with the
-- task) by the time this goes on, so the requeue fails instead of being lost silently.
UPDATE durable_task_queue t
SET status = 'pending', attempt = 0, claimed_by = NULL, claimed_at = NULL, heartbeat_at = NULL,
    max_attempts = CASE WHEN t.kind = 'activity'
                        THEN coalesce((t.retry_policy->>'max_attempts')::int, $2::int)
                        ELSE t.max_attempts END,
    visible_at = now(), start_deadline = now() + make_interval(secs => schedule_to_start_s),
    completed_at = NULL, cancel_requested_at = NULL, requeue_count = requeue_count + 1,
    updated_at = now()
WHERE t.id = $1 AND t.status = 'dead'
  AND EXISTS (SELECT 1 FROM durable_workflow_instances r WHERE r.id = t.run_id FOR KEY SHARE)
RETURNING t.*;

-- name: find_stale_tasks
-- Claimed tasks whose heartbeat is older than the global threshold, or than a workflow task's
-- own timeout. An activity's own heartbeat timeout is not this rule's: find_timed_out_tasks
-- fails that attempt as a timeout (retry policy, backoff, breaker), whichever duty looks first.
SELECT * FROM durable_task_queue
WHERE status = 'claimed'
  AND heartbeat_at < now() - make_interval(secs => CASE WHEN kind = 'activity' THEN $1
                                                      ELSE least($1, coalesce(heartbeat_timeout_s, $1)) END)
ORDER BY heartbeat_at
LIMIT $2
FOR UPDATE SKIP LOCKED;

-- name: find_tasks_of_worker
-- Claimed tasks held by one worker (its connection dropped or it shut down), locked; with $2,
-- only those claimed before $2 (when the worker's current incarnation first registered: the
-- tasks of incarnations that are gone); none of $3 (tasks an earlier look left to the
-- follow-ups, which may hold them). A task another transaction holds (a call of that worker
-- still being applied or rolled back) is waited for, not skipped: skipped, it would stay with a
-- worker that is gone.
SELECT * FROM durable_task_queue
WHERE status = 'claimed' AND claimed_by = $1
  AND ($2::timestamptz IS NULL OR claimed_at < $2)
  AND NOT (id = ANY($3::uuid[]))
ORDER BY id
FOR UPDATE;

-- name: release_task
-- Give a claimed task back to the queue at once (its attempt stays counted; with $3 it gets
-- one attempt more, so the interrupted one costs nothing), unless it has no use there: a
-- workflow task whose run has another one pending (which replays the same history) is closed,
-- and a task whose cancellation was requested is cancelled.
UPDATE durable_task_queue t
SET status = v.status, claimed_by = NULL, claimed_at = NULL, heartbeat_at = NULL,
    max_attempts = CASE WHEN $3::bool AND t.max_attempts < 2147483647
                        THEN t.max_attempts + 1 ELSE t.max_attempts END,
    completed_at = CASE WHEN v.status <> 'pending' THEN now() END,
    visible_at = now(), start_deadline = now() + make_interval(secs => t.schedule_to_start_s),
    last_error = $2::json,
    error_history = (t.error_history::jsonb || jsonb_build_array($2::jsonb))::json,
    updated_at = now()
FROM (SELECT CASE WHEN s.kind = 'workflow' AND EXISTS (
                           SELECT 1 FROM durable_task_queue p
                           WHERE p.run_id = s.run_id AND p.kind = 'workflow'
                             AND p.status = 'pending')
                       THEN 'completed'
                       WHEN s.cancel_requested_at IS NOT NULL THEN 'cancelled'
                       ELSE 'pending' END AS status
      FROM durable_task_queue s WHERE s.id = $1) v
WHERE t.id = $1
RETURNING t.*;

-- name: now
-- The database's clock (transaction time).
SELECT now();

-- name: statement_now
-- The database's clock when this statement began (later than now() in a transaction that
-- waited for a lock).
SELECT statement_timestamp();

-- name: count_pending_tasks
-- How many tasks wait in the queue.
SELECT count(*) FROM durable_task_queue WHERE status = 'pending';

-- name: insert_signal
-- Record a signal for a run.
INSERT INTO durable_signals (run_id, workflow_id, signal_type, signal_name, payload)
VALUES ($1, $2, $3, $4, $5::json)
RETURNING *;

-- name: list_signals
-- A run's signals in arrival order, optionally only the unprocessed ones.
SELECT * FROM durable_signals
WHERE run_id = $1 AND (NOT $2 OR processed_at IS NULL)
ORDER BY id;

-- name: mark_signals_processed
-- Mark signals processed.
UPDATE durable_signals SET processed_at = now()
WHERE id = ANY($1::bigint[]) AND processed_at IS NULL;

-- name: upsert_worker
-- Register (or re-register) a worker as active, as incarnation $8 (NULL: an older worker that
-- sends none); tell every control plane (its types may change). started_at is when that
-- incarnation first registered: kept when it registers again, now() for another one (and for
-- every registration without a token, each its own incarnation).
WITH registered AS (
    INSERT INTO durable_workers (id, status, activity_types, workflow_types, max_concurrency,
                                 current_load, host, pid, version, started_at, last_heartbeat_at,
                                 incarnation)
    VALUES ($1, 'active', $2, $3, $4, 0, $5, $6, $7, now(), now(), $8)
    ON CONFLICT (id) DO UPDATE
    SET status = 'active', activity_types = $2, workflow_types = $3, max_concurrency = $4,
        current_load = 0, host = $5, pid = $6, version = $7,
        started_at = CASE WHEN durable_workers.incarnation = $8 THEN durable_workers.started_at
                          ELSE now() END,
        last_heartbeat_at = now(), stopped_at = NULL, incarnation = $8
    RETURNING *
), told AS (
    SELECT pg_notify('everruns_workers', $1)
)
SELECT registered.* FROM registered, told;

-- name: heartbeat_worker
-- A live worker reports its load and status (active or draining). A row marked lost comes back
-- only for the incarnation it names ($4; NULL: a worker that sends no token): a lost row of
-- another process (a newer one that died) is not revived by an older one's heartbeat, which
-- must register again, so that its own drop later releases its tasks.
UPDATE durable_workers
SET last_heartbeat_at = now(), current_load = $2, status = $3, stopped_at = NULL
WHERE id = $1 AND (status IN ('active', 'draining')
                   OR (status = 'lost' AND ($4::text IS NULL OR incarnation = $4)))
RETURNING *;

-- name: worker_registered_at
-- When a worker's current registration (its incarnation) was made; no row: never registered.
SELECT started_at FROM durable_workers WHERE id = $1;

-- name: lock_worker_registration
-- A worker's current registration (its incarnation's token and first registration time), the
-- row locked: no registration lands until the transaction ends.
SELECT incarnation, started_at FROM durable_workers WHERE id = $1 FOR UPDATE;

-- name: stop_worker
-- A worker leaves: stopped (clean exit) or lost (connection gone, heartbeats missed). With $3,
-- only while incarnation $3 is the registered one (an old process's goodbye leaves a newer
-- process of the same worker id active).
UPDATE durable_workers
SET status = $2, current_load = 0, stopped_at = now()
WHERE id = $1 AND stopped_at IS NULL AND ($3::text IS NULL OR incarnation = $3)
RETURNING *;

-- name: mark_lost_workers
-- Workers whose heartbeats stopped more than $1 seconds ago become lost.
UPDATE durable_workers
SET status = 'lost', stopped_at = now(), current_load = 0
WHERE status IN ('active', 'draining') AND last_heartbeat_at < now() - make_interval(secs => $1)
RETURNING id;

-- name: list_workers
-- Workers, newest first; stopped and lost ones only when asked.
SELECT * FROM durable_workers
WHERE $1 OR status IN ('active', 'draining')
ORDER BY started_at DESC, id;

-- name: ensure_breaker
-- Create a closed breaker row for a key if none exists.
INSERT INTO durable_circuit_breaker_state (key) VALUES ($1) ON CONFLICT (key) DO NOTHING;

-- name: lock_breaker
-- Lock one breaker row for an atomic read-transition-write.
SELECT * FROM durable_circuit_breaker_state WHERE key = $1 FOR UPDATE;

-- name: save_breaker
-- Write a breaker's new state (caller holds the row lock).
UPDATE durable_circuit_breaker_state
SET state = $2, failure_count = $3, success_count = $4, probes_in_flight = $5,
    window_started_at = $6, opened_at = $7, last_failure_at = $8, recent_failures = $9,
    updated_at = now()
WHERE key = $1
RETURNING *;

-- name: list_breakers
-- All breakers by key.
SELECT * FROM durable_circuit_breaker_state ORDER BY key;

-- name: lock_unclosed_breakers
-- Lock every breaker that is not closed (claims consult and update them atomically).
SELECT * FROM durable_circuit_breaker_state WHERE state <> 'closed' ORDER BY key FOR UPDATE;

-- name: lock_unclosed_breakers_of
-- Lock, in key order, the breakers of keys $1 that are not closed (those a released probe may
-- write): one statement for a duty's batch (Store.lock_breakers).
SELECT key FROM durable_circuit_breaker_state
WHERE key = ANY($1::text[]) AND state <> 'closed'
ORDER BY key
FOR UPDATE;

-- name: delete_breaker
-- Reset a breaker by removing its row (it is recreated closed on next use).
DELETE FROM durable_circuit_breaker_state WHERE key = $1 RETURNING key;

-- name: insert_timer
-- Start a durable timer for a run, firing $4 seconds from now.
INSERT INTO durable_timers (run_id, workflow_id, timer_id, fire_at, partition_key)
VALUES ($1, $2, $3, now() + make_interval(secs => $4), $2)
ON CONFLICT (run_id, timer_id) DO NOTHING
RETURNING fire_at;

-- name: cancel_timer
-- Cancel a pending timer of a run (neither fired nor cancelled).
UPDATE durable_timers SET status = 'cancelled'
WHERE run_id = $1 AND timer_id = $2 AND status NOT IN ('fired', 'cancelled');

-- name: due_timers
-- Up to $1 due pending timers after ($2, $3) in (fire_at, id) order, read without locking:
-- each batch is fired in a transaction of its own (lock_runs_unless_held, then
-- fire_timers_of_locked_runs).
SELECT id, run_id, timer_id, fire_at FROM durable_timers
WHERE status = 'pending' AND fire_at <= now()
  AND (fire_at, id) > (coalesce($2::timestamptz, '-infinity'), coalesce($3::int8, 0))
ORDER BY fire_at, id LIMIT $1;

-- name: lock_runs_unless_held
-- Lock the rows of runs $1 that no other transaction holds (those are skipped, never waited
-- for); return the ids locked (a run that is gone is left out too).
SELECT id FROM durable_workflow_instances WHERE id = ANY($1::uuid[])
ORDER BY id
FOR UPDATE SKIP LOCKED;

-- name: fire_timers_of_locked_runs
-- Fire the pending timers, up to ($2, $3) in (fire_at, id) order, of runs $1, which this
-- transaction holds locked (an earlier statement took the locks, so this one's snapshot has
-- every row written under them). In an open run each timer is marked fired and gets its
-- timer_fired event, in (fire_at, id) order after the run's last event, and the run a pending
-- workflow task; in an ended run each is marked cancelled. A timer no longer pending
-- (withdrawn or fired meanwhile) is left alone. One NOTIFY per type tells how many runs were
-- woken or had their pending workflow task held here (a claim may have skipped it while this
-- held it). Returns how many fired.
-- The statement never waits for a lock. Others write the rows it writes only under their
-- run's lock, except workflow tasks: a claim makes a pending one claimed (and never waits), a
-- dead worker's release or a stale reclaim makes a claimed one pending again (it used to wait
-- for another run of this batch next; it no longer waits for runs, but may for other rows),
-- and inserting a second pending workflow task of that run would wait for the release. So an open run's live workflow tasks are locked before its own is inserted (SKIP
-- LOCKED, each at its latest version), and a run with one another transaction holds is
-- skipped: its timers stay pending for the next round.
WITH live AS (
    SELECT t.id, t.run_id FROM durable_task_queue t
    WHERE t.run_id = ANY($1::uuid[]) AND t.kind = 'workflow'
      AND t.status IN ('pending', 'claimed')
), held AS MATERIALIZED (
    SELECT t.id, t.run_id, t.status FROM durable_task_queue t
    WHERE t.id = ANY(ARRAY(SELECT id FROM live))
    FOR UPDATE SKIP LOCKED
), ready AS MATERIALIZED (
    SELECT r.id, r.completed_at IS NULL AS open FROM durable_workflow_instances r
    WHERE r.id = ANY($1::uuid[])
      AND (r.completed_at IS NOT NULL
           OR NOT EXISTS (SELECT 1 FROM live
                          WHERE live.run_id = r.id AND live.id NOT IN (SELECT id FROM held)))
), timers AS (
    UPDATE durable_timers tm
    SET status = CASE WHEN ready.open THEN 'fired' ELSE 'cancelled' END
    FROM ready
    WHERE tm.run_id = ready.id AND tm.status NOT IN ('fired', 'cancelled')
      AND (tm.fire_at, tm.id) <= ($2::timestamptz, $3::int8)
      -- the same runs as an array of keys, so that their timers are looked up by key, not
      -- read whole and joined
      AND tm.run_id = ANY(ARRAY(SELECT id FROM ready))
    RETURNING tm.id, tm.run_id, tm.timer_id, tm.fire_at, ready.open
), fired AS (
    SELECT timers.*, row_number() OVER (PARTITION BY run_id ORDER BY fire_at, id) AS n
    FROM timers WHERE open
), run AS (
    UPDATE durable_workflow_instances r
    SET last_sequence_num = r.last_sequence_num + f.n, updated_at = now()
    FROM (SELECT run_id, count(*) AS n FROM fired GROUP BY run_id) f
    WHERE r.id = f.run_id AND r.id = ANY($1::uuid[])
    RETURNING r.id, r.workflow_id, r.workflow_type, r.last_sequence_num - f.n AS base
), events AS (
    INSERT INTO durable_workflow_events (run_id, workflow_id, sequence_num, event_type, payload)
    SELECT run.id, run.workflow_id, run.base + fired.n, 'timer_fired',
           json_build_object('type', 'timer_fired', 'timer_id', fired.timer_id)
    FROM fired JOIN run ON run.id = fired.run_id
), wake AS (
    INSERT INTO durable_task_queue (id, run_id, workflow_id, kind, activity_type, max_attempts,
                                    partition_key)
    SELECT gen_random_uuid(), run.id, run.workflow_id, 'workflow', run.workflow_type,
           2147483647, run.workflow_id
    FROM run
    ON CONFLICT (run_id) WHERE kind = 'workflow' AND status = 'pending' DO NOTHING
), woke AS (
    -- The runs woken, and those whose pending workflow task this statement held locked while
    -- firing nothing (its timer fired or withdrawn meanwhile): a claim may have skipped it.
    SELECT count(*) AS n FROM (
        SELECT pg_notify('everruns_tasks', 'workflow:' || t || E'\t' || n)
        FROM (SELECT r.workflow_type AS t, count(*) AS n FROM durable_workflow_instances r
              WHERE r.id = ANY(ARRAY(SELECT id FROM run
                                     UNION SELECT run_id FROM held WHERE status = 'pending'))
              GROUP BY r.workflow_type) d) x
)
-- The uncorrelated test of woke is a one-time filter: a SELECT CTE runs only on demand.
SELECT count(*) FROM fired WHERE (SELECT n FROM woke) IS NOT NULL;

-- name: cancel_timers_of_run
-- Cancel every pending timer of an ended run.
UPDATE durable_timers SET status = 'cancelled'
WHERE run_id = $1 AND status NOT IN ('fired', 'cancelled');

-- name: next_due
-- Seconds until the next timer fires, a delayed task becomes visible, an open breaker may
-- admit probes ($1: the breakers' open duration) or a schedule fires ($2: when the round's
-- firing of schedules began) (NULL: nothing waits; negative: something is due now).
SELECT extract(epoch FROM least(
    (SELECT min(fire_at) FROM durable_timers WHERE status = 'pending'),
    (SELECT min(visible_at) FROM durable_task_queue
     WHERE status = 'pending' AND visible_at > created_at AND visible_at > now()),
    (SELECT min(opened_at) + make_interval(secs => $1) FROM durable_circuit_breaker_state
     WHERE state = 'open' AND opened_at + make_interval(secs => $1) > now()),
    -- A schedule due by $2, when this round's firing began, and due still, is held by another
    -- transaction (another control plane firing it, an operator's edit): look again in a
    -- second, not at once. One due since (or with $2 NULL, none fired) is looked at now.
    (SELECT least(min(next_fire_at) FILTER (WHERE next_fire_at > coalesce($2::timestamptz, now())),
                  CASE WHEN bool_or(next_fire_at <= coalesce($2::timestamptz, now()))
                       THEN now() + interval '1 second' END)
     FROM durable_schedules WHERE NOT paused)
) - now())::float8;

-- name: breakers_due_since
-- Whether an open breaker's open duration ($2) ended after $1 (its tasks may probe now).
SELECT EXISTS (
    SELECT 1 FROM durable_circuit_breaker_state
    WHERE state = 'open' AND opened_at + make_interval(secs => $2) > $1
      AND opened_at + make_interval(secs => $2) <= now()
);

-- name: tasks_of_run
-- A run's tasks of one kind in the given statuses, oldest first.
SELECT * FROM durable_task_queue
WHERE run_id = $1 AND kind = $2 AND status = ANY($3::text[])
ORDER BY created_at, activity_id;

-- name: pending_timers_of_run
-- A run's timers that have not fired (nor been cancelled), soonest first (the unique index on
-- run_id, timer_id finds them).
SELECT timer_id, fire_at FROM durable_timers
WHERE run_id = $1 AND status = 'pending'
ORDER BY fire_at, timer_id;

-- name: workflow_task_held
-- Whether a worker holds one of a run's workflow tasks. Locks its open workflow tasks, so that
-- a claim of one under way is waited for and seen.
WITH open AS (
    SELECT status FROM durable_task_queue
    WHERE run_id = $1 AND kind = 'workflow' AND status IN ('pending', 'claimed')
    FOR UPDATE
)
SELECT coalesce(bool_or(status = 'claimed'), false) FROM open;

-- name: request_task_cancel
-- Flag a claimed task for cancellation (its heartbeat reply and the push stream tell the holder).
UPDATE durable_task_queue SET cancel_requested_at = coalesce(cancel_requested_at, now())
WHERE id = $1 AND claimed_by IS NOT NULL
RETURNING claimed_by, lease_token;

-- name: close_workflow_task
-- Close a workflow task (applied, superseded or abandoned).
UPDATE durable_task_queue
SET status = 'completed', claimed_by = NULL, completed_at = now(), updated_at = now()
WHERE id = $1;

-- name: cancel_pending_workflow_tasks
-- Drop the pending workflow task of an ended run (pending: open and held by no one).
UPDATE durable_task_queue
SET status = 'cancelled', completed_at = now(), updated_at = now()
WHERE run_id = $1 AND kind = 'workflow' AND status IN ('pending', 'claimed')
  AND claimed_by IS NULL;

-- name: worker_serves
-- Whether a live worker serves this workflow type ($2 = 'workflow') or activity type.
SELECT EXISTS (
    SELECT 1 FROM durable_workers
    WHERE status = 'active'
      AND (CASE WHEN $2 = 'workflow' THEN $1 = ANY(workflow_types) ELSE $1 = ANY(activity_types) END)
);

-- name: lock_unclosed_breaker
-- Lock one breaker row if it is open or half-open.
SELECT * FROM durable_circuit_breaker_state WHERE key = $1 AND state <> 'closed' FOR UPDATE;

-- name: renew_held_start_deadlines
-- Pending activities whose schedule-to-start deadline passed while a circuit breaker that is not
-- closed held them get a new one (they wait behind the breaker without burning attempts).
UPDATE durable_task_queue t
SET start_deadline = now() + make_interval(secs => t.schedule_to_start_s), updated_at = now()
WHERE t.status = 'pending' AND t.start_deadline < now() AND t.kind = 'activity'
  AND EXISTS (SELECT 1 FROM durable_circuit_breaker_state b
              WHERE b.key = coalesce(t.breaker_key, t.activity_type) AND b.state <> 'closed');

-- name: find_timed_out_tasks
-- Activity tasks past a server-enforced timeout (schedule-to-start, start-to-close, heartbeat).
SELECT * FROM durable_task_queue
WHERE kind = 'activity' AND (
       (status = 'pending' AND start_deadline < now())
    OR (status = 'claimed' AND start_to_close_s IS NOT NULL
        AND claimed_at + make_interval(secs => start_to_close_s) < now())
    OR (status = 'claimed' AND heartbeat_timeout_s IS NOT NULL
        AND heartbeat_at + make_interval(secs => heartbeat_timeout_s) < now()))
LIMIT $1
FOR UPDATE SKIP LOCKED;

-- name: lock_timed_out_task
-- Lock activity task $1, waiting for whoever holds it, if it is still attempt $2 under lease $3
-- (as the timeout duty found it, which skipped it: another transaction held its run) and
-- still past a timeout find_timed_out_tasks enforces. A pending task a breaker that is not closed
-- holds back is not past its schedule-to-start timeout: it waits without burning attempts, and
-- the duty's next round renews its deadline (renew_held_start_deadlines).
SELECT * FROM durable_task_queue t
WHERE t.id = $1 AND t.attempt = $2 AND t.lease_token IS NOT DISTINCT FROM $3
  AND t.kind = 'activity' AND (
       (t.status = 'pending' AND t.start_deadline < now()
        AND NOT EXISTS (SELECT 1 FROM durable_circuit_breaker_state b
                        WHERE b.key = coalesce(t.breaker_key, t.activity_type)
                          AND b.state <> 'closed'))
    OR (t.status = 'claimed' AND t.start_to_close_s IS NOT NULL
        AND t.claimed_at + make_interval(secs => t.start_to_close_s) < now())
    OR (t.status = 'claimed' AND t.heartbeat_timeout_s IS NOT NULL
        AND t.heartbeat_at + make_interval(secs => t.heartbeat_timeout_s) < now()))
FOR UPDATE OF t;

-- name: next_timeout
-- Seconds until the next server-enforced activity timeout (NULL: none pending).
SELECT extract(epoch FROM least(
    (SELECT min(start_deadline) FROM durable_task_queue
     WHERE status = 'pending' AND start_deadline IS NOT NULL),
    (SELECT min(least(claimed_at + make_interval(secs => start_to_close_s),
                      heartbeat_at + make_interval(secs => heartbeat_timeout_s)))
     FROM durable_task_queue WHERE status = 'claimed' AND kind = 'activity')
) - now())::float8;

-- name: charge_attempt
-- Count an attempt that never started (a schedule-to-start timeout).
UPDATE durable_task_queue SET attempt = least(attempt + 1, max_attempts)
WHERE id = $1
RETURNING *;

-- name: lock_expired_runs
-- Lock up to $2 ended runs older than $1 seconds that retention may delete: not a child whose
-- parent is still open (its history names the child, whose run must stay there to inspect; it
-- goes once its parent has ended); nor a parent with an open child (deleting it would update
-- the child's row by cascade, waiting for a child whose end holds it and waits for this
-- parent: it goes once its children have ended); nor a run with a live task (an operator's
-- requeue of its dead letter): it goes once that has run. Locked runs are skipped (a requeue
-- holds its run).
SELECT c.id FROM durable_workflow_instances c
WHERE c.completed_at IS NOT NULL
  AND c.completed_at < now() - make_interval(secs => $1)
  AND NOT EXISTS (SELECT 1 FROM durable_workflow_instances p
                  WHERE p.id = c.parent_run_id AND p.completed_at IS NULL)
  -- OFFSET 0 keeps this a lookup by key per candidate: as an anti-join, PostgreSQL may read
  -- the whole index of children instead, when its statistics show few of them.
  AND NOT EXISTS (SELECT 1 FROM durable_workflow_instances k
                  WHERE k.parent_run_id = c.id AND k.completed_at IS NULL OFFSET 0)
  AND NOT EXISTS (SELECT 1 FROM durable_task_queue t
                  WHERE t.run_id = c.id AND t.status IN ('pending', 'claimed'))
ORDER BY c.completed_at LIMIT $2
FOR UPDATE OF c SKIP LOCKED;

-- name: delete_expired_runs
-- Delete the runs lock_expired_runs locked ($1), events, tasks, signals, timers and dead letters
-- with them by cascade. The live-task rule is checked again here, in a snapshot taken after the
-- locks: a requeue that committed between that statement's snapshot and its lock (a key-share
-- lock makes no new row version, so nothing re-checked it there) keeps its run.
DELETE FROM durable_workflow_instances r
WHERE r.id = ANY($1::uuid[])
  AND NOT EXISTS (SELECT 1 FROM durable_task_queue t
                  WHERE t.run_id = r.id AND t.status IN ('pending', 'claimed'))
RETURNING id;

-- name: count_new_runs
-- How many runs a batch of starts would add, deciding per start as start_workflows does: $3
-- starts name neither a workflow id nor a run id and add one each; the others come as parallel
-- arrays ($1 the workflow id, NULL for a generated one; $2 the run id the request asks for,
-- NULL for none). One whose run id names a run adds none (that run answers, whatever its
-- state), nor one whose workflow id has an open run (that run answers); the rest add one run
-- per workflow id (a later start of the id gets the first one's run), one each without one.
SELECT ($3::int + count(*) FILTER (WHERE s.workflow_id IS NULL)
        + count(DISTINCT s.workflow_id))::int
FROM unnest($1::text[], $2::uuid[]) AS s(workflow_id, run_id)
-- OFFSET 0 keeps both a lookup by key per start: as anti-joins, PostgreSQL may read every run
-- (or every open one) instead.
WHERE NOT EXISTS (SELECT 1 FROM durable_workflow_instances x WHERE x.id = s.run_id OFFSET 0)
  AND NOT EXISTS (SELECT 1 FROM durable_workflow_instances o
                  WHERE o.workflow_id = s.workflow_id AND o.status IN ('pending', 'running')
                  OFFSET 0);

-- name: release_probe
-- A half-open breaker's probe ended without a verdict: free its slot. $2 is when the task was
-- claimed: one claimed before the breaker last opened was not its probe (tasks of a breaker
-- that is not closed are handed out only as probes).
UPDATE durable_circuit_breaker_state
SET probes_in_flight = greatest(probes_in_flight - 1, 0), updated_at = now()
WHERE key = $1 AND state = 'half_open' AND probes_in_flight > 0 AND opened_at <= $2
RETURNING key;

-- name: close_superseded_task
-- Close a claimed workflow task ($2 its lease) whose run got another one pending meanwhile
-- (which replays the same history).
UPDATE durable_task_queue
SET status = 'completed', claimed_by = NULL, completed_at = now(), updated_at = now()
WHERE id = $1 AND lease_token = $2 AND claimed_by IS NOT NULL
RETURNING *;

-- name: unclaim_task
-- Undo a claim that must not stand (a half-open breaker had no probe slot left): the task goes
-- back as it was, and its attempt is not charged.
-- A workflow task whose run meanwhile got another one pending is closed instead.
UPDATE durable_task_queue t
SET status = v.status, attempt = t.attempt - 1, claimed_by = NULL, claimed_at = NULL,
    heartbeat_at = NULL, completed_at = CASE WHEN v.status <> 'pending' THEN now() END,
    updated_at = now()
FROM (SELECT CASE WHEN s.kind = 'workflow' AND EXISTS (
                           SELECT 1 FROM durable_task_queue p
                           WHERE p.run_id = s.run_id AND p.kind = 'workflow'
                             AND p.status = 'pending')
                       THEN 'completed' ELSE 'pending' END AS status
      FROM durable_task_queue s WHERE s.id = $1) v
WHERE t.id = $1 AND t.lease_token = $2 AND t.claimed_by IS NOT NULL;

-- name: lock_open_children
-- The open child runs of run $1 (which the caller holds), each locked unless another
-- transaction holds it: those are skipped, never waited for (a child's end holds the child and
-- then waits for its parent). Returns the children locked (latest versions, locked = true),
-- then the ids of the others (locked = false; their other columns are this statement's
-- snapshot, not to be used).
WITH got AS MATERIALIZED (
    SELECT * FROM durable_workflow_instances
    WHERE parent_run_id = $1 AND completed_at IS NULL
    ORDER BY created_at
    FOR UPDATE SKIP LOCKED
)
SELECT got.*, true AS locked FROM got
UNION ALL
SELECT c.*, false FROM durable_workflow_instances c
WHERE c.parent_run_id = $1 AND c.completed_at IS NULL
  AND NOT (c.id = ANY(ARRAY(SELECT id FROM got)));

-- name: find_orphaned_children
-- Up to $1 open child runs with no cancel request that their parent's end or cancel request
-- skipped (another transaction held them; their records, migration 010), or whose parent is
-- gone (a NULL parent_run_id with a child id: an operator deleted it, or retention before it
-- kept such parents; through the index of uncancelled open children, by its NULL key): the
-- reclaim round's sweep. It reads neither every open child nor every open run.
(SELECT row_id AS id, created_at FROM durable_skipped_cancels WHERE kind = 'child'
 ORDER BY created_at LIMIT $1)
UNION ALL
(SELECT c.id, c.created_at FROM durable_workflow_instances c
 WHERE c.parent_run_id IS NULL AND c.parent_child_id IS NOT NULL
   AND c.status IN ('pending', 'running') AND c.cancel_requested_at IS NULL
 LIMIT $1)
ORDER BY created_at
LIMIT $1;

-- name: lock_open_activities
-- The open activity tasks of run $1 (which the caller holds), oldest first, each locked unless
-- another transaction holds it: those are skipped, never waited for (the results statement holds
-- a task, then waits for its run). Returns the tasks locked (latest versions, locked = true),
-- then the ids of the others (locked = false; their other columns are this statement's
-- snapshot, not to be used).
WITH got AS MATERIALIZED (
    SELECT * FROM durable_task_queue
    WHERE run_id = $1 AND kind = 'activity' AND status IN ('pending', 'claimed')
    ORDER BY created_at, activity_id
    FOR UPDATE SKIP LOCKED
)
SELECT got.*, true AS locked FROM got
UNION ALL
SELECT t.*, false FROM durable_task_queue t
WHERE t.run_id = $1 AND t.kind = 'activity' AND t.status IN ('pending', 'claimed')
  AND NOT (t.id = ANY(ARRAY(SELECT id FROM got)))
ORDER BY locked DESC, created_at, activity_id;

-- name: lock_open_task
-- Lock an open (pending or claimed) task by id, waiting for whoever holds it.
SELECT * FROM durable_task_queue WHERE id = $1 AND status IN ('pending', 'claimed')
FOR UPDATE;

-- name: lock_open_task_unless_held
-- Lock an open (pending or claimed) task by id unless another transaction holds it.
SELECT * FROM durable_task_queue WHERE id = $1 AND status IN ('pending', 'claimed')
FOR UPDATE SKIP LOCKED;

-- name: find_abandoned_activities
-- Up to $1 activity tasks whose run's cancel request or end skipped them (another transaction
-- held them) and that nobody has settled yet: the reclaim round's sweep, for a control plane
-- that stopped before it came back to them. It reads only those records (migration 010), never
-- the queue.
SELECT row_id AS id FROM durable_skipped_cancels WHERE kind = 'activity'
ORDER BY created_at LIMIT $1;

-- name: remember_skipped
-- Rows $3 (activity tasks, or child runs: $2 says which) that run $1's cancel request or end
-- skipped, in the transaction that skipped them (which holds run $1).
INSERT INTO durable_skipped_cancels (row_id, kind, run_id)
SELECT unnest($3::uuid[]), $2, $1
ON CONFLICT (row_id) DO NOTHING;

-- name: forget_skipped
-- Settle the record of row $1's skip (the caller holds the row and the run that skipped it):
-- true if there was one, so the transaction that skipped it committed.
DELETE FROM durable_skipped_cancels WHERE row_id = $1 RETURNING true;

-- name: forget_skipped_if_closed
-- Settle the record of row $1's skip if that row (a task, or a child run) is no longer open or
-- is gone: nothing is left to cancel. Takes no lock on the row.
DELETE FROM durable_skipped_cancels m
WHERE m.row_id = $1
  AND NOT EXISTS (SELECT 1 FROM durable_task_queue t
                  WHERE m.kind = 'activity' AND t.id = $1 AND t.status IN ('pending', 'claimed'))
  AND NOT EXISTS (SELECT 1 FROM durable_workflow_instances r
                  WHERE m.kind = 'child' AND r.id = $1 AND r.completed_at IS NULL);

-- name: lock_run_unless_held
-- Lock a run's row unless another transaction holds it (then, or if it is gone, nothing).
SELECT * FROM durable_workflow_instances WHERE id = $1 FOR UPDATE SKIP LOCKED;

-- name: complete_activities
-- Complete claimed activities under their leases and, for each one whose run is open (and that
-- is not a requeued dead letter), append activity_started + activity_completed and make sure a
-- workflow task is pending: one statement and one WAL flush for them all. Parallel arrays $1 task ids, $2 lease tokens, $3 results (JSON text), $4 worker id. Tasks of
-- one run get consecutive event numbers in request order; each run reserves its numbers once
-- and gets one workflow task. With $5 (workflow types the completing worker serves) and $6 (how
-- many it can take), workflow tasks of those types are handed straight to worker $4 when no
-- other workflow task of the run is out.
-- Decisions made ahead (the worker's decision of the workflow task a result wakes, planned by
-- the caller), parallel arrays numbered from 1: $7 the result (its $1 position, from 1) each
-- follows, $8 its run, $9 its activity id, $10 the sequence number of the decision it continues
-- ($11: the time that decision's marker records), $12 the history end it saw (this result's
-- events included), $13 its event count, $14-$16 the run end (status, result JSON, error JSON).
-- Its events, flattened: $17 decision number, $18 position within it (from 1), $19 types, $20
-- JSON texts; its activities, flattened: $21 decision number, $22 ids, $23 types, $24 activity
-- ids, $25 inputs, $26 max attempts, $27 priorities, $28 retry policies, $29-$31
-- schedule-to-start, start-to-close and heartbeat timeouts, $32 breaker keys, $33 eager flags.
-- A decision applies, in this statement, only when its run is open and locked here with this
-- one result, the history ends where the decision assumed (its result's events next), the
-- decision it continues is a marker of $4 at that time followed by activity_scheduled events
-- only, no other workflow task of the run is out, and (if it ends the run) the run has no
-- parent, no other open task, no open child and no pending timer: then the workflow task is
-- recorded completed, its events appended, its activities enqueued (eager ones claimed for $4
-- unless their breaker is not closed) and the run ended if asked. A decision that does not
-- apply writes nothing; its workflow task is made as without it. Returns one row per completed request (task_id: the
-- lease held; decided: its decision applied) with its breaker key when that breaker is
-- half-open and the task was its probe, one row per eager workflow task (its columns, and its
-- run's full history as parallel arrays: the events this statement appends are not in its snapshot, so they are added from
-- the insert), and one row per activity claimed for an applied decision (its columns, and
-- decided_no: the decision's number).
WITH req AS (
    SELECT * FROM unnest($1::uuid[], $2::int8[], $3::text[]) WITH ORDINALITY AS r(id, lease, result, ord)
), task AS (
    UPDATE durable_task_queue t
    SET status = 'completed', result = req.result::json, claimed_by = NULL,
        completed_at = now(), updated_at = now()
    FROM req
    WHERE t.id = req.id AND t.lease_token = req.lease AND t.claimed_by IS NOT NULL
    RETURNING t.id, t.run_id, t.activity_id, t.attempt, t.requeue_count, req.ord, req.result,
              coalesce(t.breaker_key, t.activity_type) AS bkey, t.claimed_at
), per_run AS (
    SELECT run_id, count(*) AS n FROM task WHERE requeue_count = 0 GROUP BY run_id
), locked AS (
    -- Run rows are locked newest first (then in id order), so two batches that share runs
    -- cannot deadlock, and a child (always newer than its parent) is locked before its
    -- parent, as a child's end locks them: in id order, a batch with results of both could
    -- hold the parent and wait for a child whose end waited for that parent. A locked row
    -- reads as its latest version: last is the history's end as committed.
    SELECT r.id, per_run.n, r.last_sequence_num AS last, r.status, r.parent_run_id
    FROM durable_workflow_instances r JOIN per_run ON r.id = per_run.run_id
    ORDER BY r.created_at DESC, r.id
    FOR UPDATE OF r
), dreq AS (
    SELECT * FROM unnest($7::int[], $8::uuid[], $9::text[], $10::int[], $11::text[], $12::int[],
                         $13::int[], $14::text[], $15::text[], $16::text[])
         WITH ORDINALITY AS d(ord, run_id, activity_id, after_seq, after_time, seen, n_events,
                              end_status, end_result, end_error, no)
), quiet AS (
    -- Runs whose history in this statement's snapshot ends where the locked row says (events
    -- another transaction committed after the snapshot, and a workflow task it handed out,
    -- are invisible here) and that have no workflow task out: only these may have their next
    -- workflow task decided here or handed out with their history.
    SELECT locked.id FROM locked
    WHERE (SELECT s.last_sequence_num FROM durable_workflow_instances s
           WHERE s.id = locked.id) = locked.last
      AND NOT EXISTS (SELECT 1 FROM durable_task_queue w
                      WHERE w.run_id = locked.id AND w.kind = 'workflow'
                        AND w.status IN ('pending', 'claimed'))
), gate AS (
    SELECT dreq.*, task.id AS done_task
    FROM dreq
    JOIN task ON task.ord = dreq.ord AND task.run_id = dreq.run_id
             AND task.activity_id = dreq.activity_id AND task.requeue_count = 0
    JOIN locked ON locked.id = task.run_id AND locked.n = 1
    JOIN quiet ON quiet.id = locked.id
    WHERE locked.status IN ('pending', 'running')
      AND locked.last = dreq.seen - 2 AND locked.last > dreq.after_seq
      AND EXISTS (SELECT 1 FROM durable_workflow_events m
                  WHERE m.run_id = locked.id AND m.sequence_num = dreq.after_seq + 1
                    AND m.event_type = 'workflow_task_completed'
                    AND m.payload->>'worker_id' = $4 AND m.payload->>'time' = dreq.after_time)
      AND NOT EXISTS (SELECT 1 FROM durable_workflow_events e
                      WHERE e.run_id = locked.id AND e.sequence_num > dreq.after_seq + 1
                        AND e.sequence_num <= locked.last
                        AND e.event_type <> 'activity_scheduled')
      AND (dreq.end_status IS NULL OR (
          locked.parent_run_id IS NULL
          AND NOT EXISTS (SELECT 1 FROM durable_task_queue o
                          WHERE o.run_id = locked.id AND o.id <> task.id
                            AND o.status IN ('pending', 'claimed'))
          AND NOT EXISTS (SELECT 1 FROM durable_workflow_instances c
                          WHERE c.parent_run_id = locked.id
                            AND c.completed_at IS NULL)
          AND NOT EXISTS (SELECT 1 FROM durable_timers tm
                          WHERE tm.run_id = locked.id
                            AND tm.status NOT IN ('fired', 'cancelled'))))
), run AS (
    UPDATE durable_workflow_instances r
    SET last_sequence_num = r.last_sequence_num + 2 * locked.n + coalesce(gate.n_events, 0),
        updated_at = now(),
        status = coalesce(gate.end_status,
                          CASE WHEN gate.no IS NOT NULL AND r.status = 'pending' THEN 'running'
                               ELSE r.status END),
        started_at = CASE WHEN gate.no IS NULL THEN r.started_at
                          ELSE coalesce(r.started_at, now()) END,
        result = CASE WHEN gate.end_status = 'completed' THEN gate.end_result::json
                      ELSE r.result END,
        error = CASE WHEN gate.end_status = 'failed' THEN gate.end_error::json ELSE r.error END,
        completed_at = CASE WHEN gate.end_status IS NULL THEN r.completed_at ELSE now() END,
        -- A decision applied: the run replays again (if it was stuck, it recovered).
        stuck_reason = CASE WHEN gate.no IS NULL THEN r.stuck_reason END
    FROM locked LEFT JOIN gate ON gate.run_id = locked.id
    WHERE r.id = locked.id AND r.completed_at IS NULL
    RETURNING r.id, r.workflow_id, r.workflow_type, gate.no AS decided_no,
              gate.end_status AS ended,
              r.last_sequence_num - 2 * locked.n - coalesce(gate.n_events, 0) AS base
), numbered AS (
    SELECT task.*, run.workflow_id,
           run.base + 2 * row_number() OVER (PARTITION BY task.run_id ORDER BY task.ord) AS seq
    FROM task JOIN run ON run.id = task.run_id
    WHERE task.requeue_count = 0
), events AS (
    INSERT INTO durable_workflow_events (run_id, workflow_id, sequence_num, event_type, payload)
    SELECT run_id, workflow_id, seq - 1, 'activity_started',
           json_build_object('type', 'activity_started', 'activity_id', activity_id,
                             'attempt', attempt, 'worker_id', $4::text)
    FROM numbered
    UNION ALL
    SELECT run_id, workflow_id, seq, 'activity_completed',
           json_build_object('type', 'activity_completed', 'activity_id', activity_id,
                             'attempt', attempt, 'result', result::json)
    FROM numbered
    UNION ALL
    SELECT run.id, run.workflow_id, gate.seen + e.n, e.t, e.p::json
    FROM unnest($17::int[], $18::int[], $19::text[], $20::text[]) AS e(no, n, t, p)
         JOIN gate ON gate.no = e.no
         JOIN run ON run.id = gate.run_id
    RETURNING run_id, sequence_num, event_type, payload::text AS payload, created_at
), offer AS (
    -- Eager only for a quiet run: otherwise the history sent would have a gap.
    SELECT run.*, e.eager AND row_number() OVER (ORDER BY e.eager DESC, run.id) <= $6 AS eager
    FROM run, LATERAL (
        SELECT run.workflow_type = ANY($5::text[])
               AND EXISTS (SELECT 1 FROM quiet WHERE quiet.id = run.id) AS eager) e
    WHERE run.decided_no IS NULL
), wft AS (
    -- A decision applied: its workflow task, recorded completed. Otherwise the run's next
    -- workflow task, claimed for $4 when offered, else pending.
    INSERT INTO durable_task_queue (id, run_id, workflow_id, kind, activity_type, max_attempts,
                                    partition_key, status, claimed_by, claimed_at, heartbeat_at,
                                    attempt, lease_token, completed_at)
    SELECT gen_random_uuid(), offer.id, offer.workflow_id, 'workflow', offer.workflow_type,
           2147483647, offer.workflow_id,
           CASE WHEN offer.eager THEN 'claimed' ELSE 'pending' END,
           CASE WHEN offer.eager THEN $4 END,
           CASE WHEN offer.eager THEN now() END,
           CASE WHEN offer.eager THEN now() END,
           CASE WHEN offer.eager THEN 1 ELSE 0 END,
           CASE WHEN offer.eager THEN nextval('durable_lease_tokens') END,
           NULL::timestamptz
    FROM offer
    UNION ALL
    SELECT gen_random_uuid(), run.id, run.workflow_id, 'workflow', run.workflow_type,
           2147483647, run.workflow_id, 'completed', NULL, now(), now(), 1, NULL, now()
    FROM run WHERE run.decided_no IS NOT NULL
    ON CONFLICT (run_id) WHERE kind = 'workflow' AND status = 'pending' DO NOTHING
    RETURNING *
), inserted AS (
    INSERT INTO durable_task_queue (id, run_id, workflow_id, kind, activity_type, activity_id,
        input, max_attempts, priority, visible_at, retry_policy, schedule_to_start_s,
        start_to_close_s, heartbeat_timeout_s, breaker_key, partition_key, start_deadline,
        status, claimed_by, claimed_at, heartbeat_at, attempt, lease_token)
    SELECT a.id, run.id, run.workflow_id, 'activity', a.activity_type, a.activity_id,
           a.input::json, a.max_attempts, a.priority, now(), a.retry_policy::json, a.s2s, a.s2c,
           a.hb, a.bkey, run.workflow_id, now() + make_interval(secs => a.s2s),
           CASE WHEN e.eager THEN 'claimed' ELSE 'pending' END,
           CASE WHEN e.eager THEN $4 END,
           CASE WHEN e.eager THEN now() END,
           CASE WHEN e.eager THEN now() END,
           CASE WHEN e.eager THEN 1 ELSE 0 END,
           CASE WHEN e.eager THEN nextval('durable_lease_tokens') END
    FROM unnest($21::int[], $22::uuid[], $23::text[], $24::text[], $25::text[], $26::int[],
                $27::int[], $28::text[], $29::float8[], $30::float8[], $31::float8[],
                $32::text[], $33::bool[])
         AS a(no, id, activity_type, activity_id, input, max_attempts, priority, retry_policy,
              s2s, s2c, hb, bkey, want_eager)
         JOIN run ON run.decided_no = a.no,
         LATERAL (SELECT a.want_eager AND NOT EXISTS (
                      SELECT 1 FROM durable_circuit_breaker_state b
                      WHERE b.key = coalesce(a.bkey, a.activity_type) AND b.state <> 'closed'
                  ) AS eager) e
    RETURNING *
), woke AS (
    SELECT count(*) AS n FROM (
        SELECT pg_notify('everruns_tasks', d.kind || ':' || d.t || E'\t' || d.n)
        FROM (SELECT kind, activity_type AS t, count(*) AS n
              FROM (SELECT kind, activity_type, status FROM wft
                    UNION ALL SELECT kind, activity_type, status FROM inserted) x
              WHERE status = 'pending' GROUP BY kind, activity_type) d
        UNION ALL
        SELECT pg_notify('everruns_runs', run.id::text) FROM run WHERE run.ended IS NOT NULL) x
), done AS (
    -- A success counts for a half-open breaker only from its probe (claimed since it opened).
    SELECT task.id AS task_id, task.ord AS done_ord, b.key AS breaker,
           EXISTS (SELECT 1 FROM gate WHERE gate.done_task = task.id) AS decided
    FROM task LEFT JOIN durable_circuit_breaker_state b
         ON b.key = task.bkey AND b.state = 'half_open' AND b.opened_at <= task.claimed_at
), eager AS (
    SELECT wft.*, NULL::int AS decided_no FROM wft WHERE wft.status = 'claimed'
    UNION ALL
    SELECT inserted.*, run.decided_no FROM inserted JOIN run ON run.id = inserted.run_id
    WHERE inserted.status = 'claimed'
)
-- Every kind of row in one result: a full join on a condition that never holds.
SELECT done.*, eager.*, true AS run_open, h.seqs, h.types, h.payloads, h.times
FROM done FULL JOIN eager ON done.task_id = eager.id
LEFT JOIN LATERAL (
    SELECT array_agg(e.sequence_num ORDER BY e.sequence_num) AS seqs,
           array_agg(e.event_type ORDER BY e.sequence_num) AS types,
           array_agg(e.payload ORDER BY e.sequence_num) AS payloads,
           array_agg(e.created_at ORDER BY e.sequence_num) AS times
    FROM (SELECT sequence_num, event_type, payload::text AS payload, created_at
          FROM durable_workflow_events WHERE run_id = eager.run_id AND eager.kind = 'workflow'
          UNION ALL
          SELECT sequence_num, event_type, payload, created_at
          FROM events WHERE run_id = eager.run_id AND eager.kind = 'workflow') e
) h ON true
WHERE (SELECT n FROM woke) IS NOT NULL;

-- name: claim_tasks_fast
-- The claim of claim_tasks when no breaker is known to be open or half-open here (tasks of a
-- breaker that is not closed are still left alone, checked per row by primary key). One ordered
-- scan of the claim index per (kind, type) key, each stopping at the limit, instead of one scan
-- of every pending row of all the types. It looks at one row more than it claims: more_pending
-- says whether claimable tasks were left behind (the caller then wakes another claimer).
-- One statement claims for several claimers: $1 names the worker of each of the $4 slots, and
-- the task ranked n in claim order goes to slot n (claim_rank).
-- Workflow tasks come with their run's history (run_open, seqs, types, payloads, times).
WITH keys AS (
    SELECT 'workflow' AS kind, t AS type FROM unnest($2::text[]) AS t
    UNION ALL
    SELECT 'activity', t FROM unnest($3::text[]) AS t
), picked AS (
    SELECT c.id, c.priority, c.visible_at FROM keys, LATERAL (
        SELECT t.id, t.priority, t.visible_at FROM durable_task_queue t
        WHERE t.status = 'pending' AND t.kind = keys.kind AND t.activity_type = keys.type
          AND t.visible_at <= now()
          AND (t.kind = 'workflow' OR NOT EXISTS (
                SELECT 1 FROM durable_circuit_breaker_state b
                WHERE b.key = coalesce(t.breaker_key, t.activity_type) AND b.state <> 'closed'))
        ORDER BY t.priority DESC, t.visible_at
        LIMIT $4 + 1
        FOR UPDATE OF t SKIP LOCKED
    ) c
    ORDER BY c.priority DESC, c.visible_at
    LIMIT $4 + 1
), ranked AS (
    SELECT id, row_number() OVER (ORDER BY priority DESC, visible_at) AS rank,
           count(*) OVER () AS found
    FROM picked
), claimed AS (
    UPDATE durable_task_queue t
    SET status = 'claimed', claimed_by = ($1::text[])[ranked.rank], claimed_at = now(),
        heartbeat_at = now(), attempt = t.attempt + 1,
        lease_token = nextval('durable_lease_tokens'), updated_at = now()
    FROM ranked WHERE t.id = ranked.id AND ranked.rank <= $4
      -- the same rows as an array of keys, so that they are looked up by key: for LIMIT $4
      -- a generic plan guesses a tenth of what the claim index holds, and joined a scan of
      -- the whole queue to that many rows (5 ms a claim with 10,000 tasks waiting)
      AND t.id = ANY(ARRAY(SELECT id FROM ranked WHERE rank <= $4))
    RETURNING t.*, ranked.found > $4 AS more_pending, ranked.rank AS claim_rank
), started AS (
    -- Runs whose first workflow task this is become running in the same commit. A run row
    -- locked by another transaction is skipped, never waited for: that transaction (a signal,
    -- say) may be waiting for the task row this statement holds. Completing the workflow task
    -- marks such a run running instead.
    UPDATE durable_workflow_instances r
    SET status = 'running', started_at = coalesce(r.started_at, now()), updated_at = now()
    WHERE r.id IN (
        SELECT p.id FROM durable_workflow_instances p
        JOIN claimed ON claimed.kind = 'workflow' AND p.id = claimed.run_id
        WHERE p.started_at IS NULL AND p.completed_at IS NULL
        FOR UPDATE OF p SKIP LOCKED)
)
-- A claimed workflow task comes with whether its run is open and the run's full history (as
-- parallel arrays), so handing it out needs no second round trip.
SELECT claimed.*, r.status IN ('pending', 'running') AS run_open,
       h.seqs, h.types, h.payloads, h.times
FROM claimed
LEFT JOIN durable_workflow_instances r ON claimed.kind = 'workflow' AND r.id = claimed.run_id
LEFT JOIN LATERAL (
    SELECT array_agg(e.sequence_num ORDER BY e.sequence_num) AS seqs,
           array_agg(e.event_type ORDER BY e.sequence_num) AS types,
           array_agg(e.payload::text ORDER BY e.sequence_num) AS payloads,
           array_agg(e.created_at ORDER BY e.sequence_num) AS times
    FROM durable_workflow_events e
    WHERE claimed.kind = 'workflow' AND e.run_id = claimed.run_id
) h ON true;

-- name: any_unclosed_breaker
-- Whether any circuit breaker is open or half-open.
SELECT EXISTS (SELECT 1 FROM durable_circuit_breaker_state WHERE state <> 'closed');

-- name: start_runs
-- Mark runs picked up by a worker running (pending -> running) and read the full histories of
-- those still open, in order. Runs already running are only read: no write, so no WAL flush
-- (the claim statement has usually marked them already). A run still open with no event (none
-- exists) would come back as one row of NULLs but its run_id.
WITH started AS (
    UPDATE durable_workflow_instances
    SET status = 'running', started_at = coalesce(started_at, now()), updated_at = now()
    WHERE id = ANY($1::uuid[]) AND started_at IS NULL AND completed_at IS NULL
), open AS (
    -- the statement's snapshot: runs pending (being started here) or running
    SELECT id FROM durable_workflow_instances
    WHERE id = ANY($1::uuid[]) AND completed_at IS NULL
)
SELECT open.id AS run_id, e.sequence_num, e.event_type, e.payload::text AS payload,
       e.created_at
FROM open LEFT JOIN durable_workflow_events e ON e.run_id = open.id
ORDER BY open.id, e.sequence_num;

-- name: close_workflow_tasks
-- Close several workflow tasks at once (their runs ended meanwhile).
UPDATE durable_task_queue
SET status = 'completed', claimed_by = NULL, completed_at = now(), updated_at = now()
WHERE id = ANY($1::uuid[]);

-- name: handed_out_by_completion
-- The activity tasks that applying workflow task $1 under lease $2 claimed for worker $3 and
-- that it still holds: claimed in that transaction (their claimed_at is its completed_at, the
-- transaction's now()). A worker whose CompleteWorkflowTasks reply was lost retries the call
-- and finds the task completed; these are what the lost reply carried.
SELECT t.* FROM durable_task_queue w
JOIN durable_task_queue t ON t.run_id = w.run_id AND t.kind = 'activity'
                         AND t.status = 'claimed' AND t.claimed_by = $3
                         AND t.claimed_at = w.completed_at
WHERE w.id = $1 AND w.lease_token = $2 AND w.kind = 'workflow' AND w.status = 'completed'
ORDER BY t.id;

-- name: handed_out_by_result
-- Activity task $1's result, recorded under lease $2 (its status completed), and the workflow
-- task of its run that the same statement claimed for worker $3 (claimed_at = the activity's
-- completed_at, the transaction's now()) and that it still holds: what the reply of a
-- CompleteActivityTasks call carried, for the worker's retry of a call whose reply was lost.
-- One row with the activity alone when there is no such workflow task; none when the result
-- was not recorded under that lease. recorded: the result recorded (the caller compares it).
SELECT a.result::text AS recorded, w.* FROM durable_task_queue a
LEFT JOIN durable_task_queue w ON w.run_id = a.run_id AND w.kind = 'workflow'
                              AND w.status = 'claimed' AND w.claimed_by = $3
                              AND w.claimed_at = a.completed_at
WHERE a.id = $1 AND a.lease_token = $2 AND a.kind = 'activity' AND a.status = 'completed';

-- name: claimed_first_task_of
-- The first workflow task of run $1 if it is claimed for worker $2 (an eager start whose
-- reply was lost: nothing handed it to the worker's poll).
SELECT * FROM durable_task_queue
WHERE run_id = $1 AND kind = 'workflow' AND status = 'claimed' AND claimed_by = $2
  AND attempt = 1;

-- name: taken_task_ids
-- Which of the task ids $1 name a task already.
SELECT id FROM durable_task_queue WHERE id = ANY($1::uuid[]);

-- name: lock_leased_with_run
-- Lock a claimed task (if the caller holds its lease) together with its run.
SELECT t.id AS task_id, r.*
FROM durable_task_queue t JOIN durable_workflow_instances r ON r.id = t.run_id
WHERE t.id = $1 AND t.lease_token = $2 AND t.claimed_by IS NOT NULL
FOR UPDATE;

-- name: apply_workflow_tasks
-- Apply workflow tasks' outcomes (of one worker, $25) in one statement and one transaction,
-- each task only if the caller holds its lease, its run is open and the run's history ends
-- where the task saw it; a task whose conditions fail writes nothing (the caller takes it
-- through the general path, under the run's lock). For each task applied: enqueue its
-- activities (rows flagged eager are handed straight to worker $25, claimed with a fresh lease,
-- unless their breaker is not closed; the others wake claimers with one NOTIFY per type),
-- append its events, close the task, mark the run's signals processed, end the run if asked (a
-- NOTIFY on everruns_runs; with $26, only a run with no parent, no other open task, no open
-- child and no pending timer), make a run still pending (its claim could not mark it) running,
-- and clear the run's stuck mark (it replays again).
-- Tasks, in parallel arrays numbered from 1 by position: $1 ids, $2 leases, $3 expected history
-- ends, $4 event counts, $5-$7 the run end (status, result JSON, error JSON). Events, flattened:
-- $8 task number, $9 position within its task (from 1), $10 types, $11 JSON texts. Activities,
-- flattened: $12 task number, $13 ids, $14 types, $15 activity ids, $16 inputs, $17 max
-- attempts, $18 priorities, $19 retry policies, $20-$22 schedule-to-start, start-to-close and
-- heartbeat timeouts, $23 breaker keys, $24 eager flags. Of several tasks of one run only the
-- first is applied. A task or run that another transaction holds locked is skipped, never
-- waited for (the caller takes that task through the general path, which waits for its one
-- run): holding some runs while waiting for another could deadlock with a transaction that
-- locks a parent and then its child. Returns one row per task (task_no, applied), joined with
-- its eager claims' columns.
WITH req AS (
    SELECT * FROM unnest($1::uuid[], $2::int8[], $3::int[], $4::int[], $5::text[], $6::text[],
                         $7::text[])
         WITH ORDINALITY AS q(task_id, lease, seen, n_events, end_status, end_result, end_error,
                              no)
), gate AS (
    -- Each task, then its run, is looked up by its key: a subquery that locks is planned on
    -- its own, per request row. As plain joins, a planner that believes few runs are open
    -- (their table never analyzed, say, right after a burst of starts) read every open run
    -- and probed the task's key once per open run and request (54 ms for ten tasks with
    -- 2,000 runs open).
    SELECT req.no, req.task_id, req.n_events, req.end_status, req.end_result, req.end_error,
           r.id, r.workflow_id, r.last_sequence_num, r.parent_run_id
    FROM req
    CROSS JOIN LATERAL (
        SELECT t.run_id FROM durable_task_queue t
        WHERE t.id = req.task_id AND t.lease_token = req.lease AND t.claimed_by IS NOT NULL
        FOR UPDATE SKIP LOCKED
    ) t
    CROSS JOIN LATERAL (
        SELECT r.id, r.workflow_id, r.last_sequence_num, r.parent_run_id
        FROM durable_workflow_instances r
        WHERE r.id = t.run_id AND r.completed_at IS NULL AND r.last_sequence_num = req.seen
        FOR UPDATE SKIP LOCKED
    ) r
), ok AS (
    SELECT DISTINCT ON (gate.id) gate.* FROM gate
    WHERE gate.end_status IS NULL OR NOT $26::bool OR (
        gate.parent_run_id IS NULL
        AND NOT EXISTS (SELECT 1 FROM durable_task_queue o
                        WHERE o.run_id = gate.id AND o.id <> gate.task_id
                          AND o.status IN ('pending', 'claimed'))
        AND NOT EXISTS (SELECT 1 FROM durable_workflow_instances c
                        WHERE c.parent_run_id = gate.id AND c.completed_at IS NULL)
        AND NOT EXISTS (SELECT 1 FROM durable_timers tm
                        WHERE tm.run_id = gate.id AND tm.status NOT IN ('fired', 'cancelled')))
    ORDER BY gate.id, gate.no
), inserted AS (
    INSERT INTO durable_task_queue (id, run_id, workflow_id, kind, activity_type, activity_id,
        input, max_attempts, priority, visible_at, retry_policy, schedule_to_start_s,
        start_to_close_s, heartbeat_timeout_s, breaker_key, partition_key, start_deadline,
        status, claimed_by, claimed_at, heartbeat_at, attempt, lease_token)
    SELECT a.id, ok.id, ok.workflow_id, 'activity', a.activity_type, a.activity_id,
           a.input::json, a.max_attempts, a.priority, now(), a.retry_policy::json, a.s2s, a.s2c,
           a.hb, a.bkey, ok.workflow_id, now() + make_interval(secs => a.s2s),
           CASE WHEN e.eager THEN 'claimed' ELSE 'pending' END,
           CASE WHEN e.eager THEN $25 END,
           CASE WHEN e.eager THEN now() END,
           CASE WHEN e.eager THEN now() END,
           CASE WHEN e.eager THEN 1 ELSE 0 END,
           CASE WHEN e.eager THEN nextval('durable_lease_tokens') END
    FROM unnest($12::int[], $13::uuid[], $14::text[], $15::text[], $16::text[], $17::int[],
                $18::int[], $19::text[], $20::float8[], $21::float8[], $22::float8[],
                $23::text[], $24::bool[])
         AS a(no, id, activity_type, activity_id, input, max_attempts, priority, retry_policy,
              s2s, s2c, hb, bkey, want_eager)
         JOIN ok ON ok.no = a.no,
         LATERAL (SELECT a.want_eager AND $25::text IS NOT NULL AND NOT EXISTS (
                      SELECT 1 FROM durable_circuit_breaker_state b
                      WHERE b.key = coalesce(a.bkey, a.activity_type) AND b.state <> 'closed'
                  ) AS eager) e
    RETURNING *
), run AS (
    UPDATE durable_workflow_instances r
    SET last_sequence_num = r.last_sequence_num + ok.n_events, updated_at = now(),
        status = coalesce(ok.end_status,
                          CASE WHEN r.status = 'pending' THEN 'running' ELSE r.status END),
        started_at = coalesce(r.started_at, now()),
        result = CASE WHEN ok.end_status = 'completed' THEN ok.end_result::json ELSE r.result END,
        error = CASE WHEN ok.end_status = 'failed' THEN ok.end_error::json ELSE r.error END,
        completed_at = CASE WHEN ok.end_status IS NULL THEN r.completed_at ELSE now() END,
        stuck_reason = NULL  -- a decision applied: the run replays again (it recovered)
    FROM ok WHERE r.id = ok.id
    RETURNING r.id
), events AS (
    INSERT INTO durable_workflow_events (run_id, workflow_id, sequence_num, event_type, payload)
    SELECT ok.id, ok.workflow_id, ok.last_sequence_num + e.n, e.t, e.p::json
    FROM unnest($8::int[], $9::int[], $10::text[], $11::text[]) AS e(no, n, t, p)
         JOIN ok ON ok.no = e.no
), task AS (
    UPDATE durable_task_queue t
    SET status = 'completed', claimed_by = NULL, completed_at = now(), updated_at = now()
    FROM ok WHERE t.id = ok.task_id
), signals AS (
    UPDATE durable_signals s SET processed_at = now()
    FROM ok WHERE s.run_id = ok.id AND s.processed_at IS NULL
), woke AS (
    SELECT count(*) AS n FROM (
        SELECT pg_notify('everruns_tasks', 'activity:' || t || E'\t' || n)
        FROM (SELECT activity_type AS t, count(*) AS n FROM inserted WHERE status = 'pending'
              GROUP BY activity_type) d
        UNION ALL
        SELECT pg_notify('everruns_runs', ok.id::text) FROM ok WHERE ok.end_status IS NOT NULL) x
)
-- The uncorrelated test of woke is a one-time filter, run before the join: a SELECT CTE runs
-- only on demand, so a plain join would skip its NOTIFYs whenever no row is claimed.
SELECT req.no AS task_no, ok.no IS NOT NULL AS applied, inserted.*
FROM req
LEFT JOIN ok ON ok.no = req.no
LEFT JOIN inserted ON inserted.run_id = ok.id AND inserted.status = 'claimed'
WHERE (SELECT n FROM woke) IS NOT NULL
ORDER BY req.no;

-- name: get_worker
-- One worker's registration.
SELECT * FROM durable_workers WHERE id = $1;

-- name: newly_visible_keys
-- Task keys (kind:type) of pending tasks made visible after $1 (later than they were written:
-- a backoff, a release, a requeue; a task visible when written was announced then), or whose
-- next task in
-- claim order has waited visible for more than $2 seconds (a safety net: a wake-up lost
-- anywhere costs at most one scanner round), with the database time and the seconds until
-- the scanner should look again for stragglers (None: no task waits). The keys are walked
-- through the claim index one at a time (a skip scan) and each key's next task is looked up,
-- so a backlog costs a few index probes per key, not a read of every waiting task.
WITH RECURSIVE waiting AS (
    (SELECT kind, activity_type FROM durable_task_queue
     WHERE status = 'pending' ORDER BY kind, activity_type LIMIT 1)
    UNION ALL
    SELECT after.kind, after.activity_type FROM waiting w, LATERAL (
        SELECT t.kind, t.activity_type FROM durable_task_queue t
        WHERE t.status = 'pending' AND (t.kind, t.activity_type) > (w.kind, w.activity_type)
        ORDER BY t.kind, t.activity_type LIMIT 1) after
), heads AS (
    SELECT w.kind || ':' || w.activity_type AS key, head.visible_at
    FROM waiting w, LATERAL (
        SELECT t.visible_at FROM durable_task_queue t
        WHERE t.status = 'pending' AND t.kind = w.kind AND t.activity_type = w.activity_type
          AND t.visible_at <= now()
        ORDER BY t.priority DESC, t.visible_at LIMIT 1) head
), straggling AS (
    SELECT key FROM heads WHERE visible_at < now() - make_interval(secs => $2)
), fresh AS (
    -- Tasks made visible later than they were written (the others were announced then).
    SELECT kind || ':' || activity_type AS key FROM durable_task_queue
    WHERE status = 'pending' AND visible_at > created_at AND visible_at <= now()
      AND visible_at > $1
)
SELECT k.key, now() AS now,
       -- when to look again: when a head that waits now would straggle, or (one straggles
       -- already: its wake-up was lost, or its claimers are busy) $2 seconds from now
       (SELECT min(CASE WHEN visible_at > now() - make_interval(secs => $2)
                        THEN extract(epoch FROM visible_at - now())::float8 + $2
                        ELSE $2 END) FROM heads) AS next_straggler_s
FROM (SELECT key FROM fresh UNION SELECT key FROM straggling) k
RIGHT JOIN (SELECT 1) one ON true;

-- name: start_workflow_for
-- Start one run ($1 workflow id, '' for a generated UUID; $2 type; $3 input JSON) with its
-- workflow task claimed for worker $4, whose long poll waits for it here (eager start): the
-- run is running at once, its first event written, its task claimed with a fresh lease, and
-- no NOTIFY goes out. A workflow id with an open run gets that run back and creates nothing.
-- $5, when not NULL, is the run id the request asks for (a retried request names the same one):
-- if that run exists, whatever its state, it comes back and nothing is created.
-- One row: the workflow id, the run id (NULL only if the open run ended in the same instant),
-- whether it was created, and for a new run its task's columns and its one event.
WITH req AS MATERIALIZED (
    SELECT coalesce($5::uuid, gen_random_uuid()) AS run_id,
           CASE WHEN $1::text = '' THEN gen_random_uuid()::text ELSE $1::text END AS workflow_id,
           (SELECT x.id FROM durable_workflow_instances x WHERE x.id = $5::uuid) AS earlier
), ins AS (
    INSERT INTO durable_workflow_instances (id, workflow_id, workflow_type, input, partition_key,
                                            last_sequence_num, status, started_at)
    SELECT run_id, workflow_id, $2::text, $3::text::json, workflow_id, 1, 'running', now()
    FROM req WHERE req.earlier IS NULL
    ON CONFLICT (workflow_id) WHERE status IN ('pending', 'running') DO NOTHING
    RETURNING id, workflow_id, workflow_type
), events AS (
    INSERT INTO durable_workflow_events (run_id, workflow_id, sequence_num, event_type, payload)
    SELECT ins.id, ins.workflow_id, 1, 'workflow_started',
           json_build_object('type', 'workflow_started', 'workflow_type', ins.workflow_type,
                             'workflow_id', ins.workflow_id, 'run_id', ins.id,
                             'input', $3::text::json)
    FROM ins
    RETURNING sequence_num, event_type, payload::text AS payload, created_at AS event_at
), wft AS (
    INSERT INTO durable_task_queue (id, run_id, workflow_id, kind, activity_type, max_attempts,
                                    partition_key, status, claimed_by, claimed_at, heartbeat_at,
                                    attempt, lease_token)
    SELECT gen_random_uuid(), ins.id, ins.workflow_id, 'workflow', ins.workflow_type,
           2147483647, ins.workflow_id, 'claimed', $4::text, now(), now(), 1,
           nextval('durable_lease_tokens')
    FROM ins
    RETURNING *
)
SELECT req.workflow_id AS started_workflow_id,
       coalesce(ins.id, req.earlier,
                (SELECT open.id FROM durable_workflow_instances open
                 WHERE open.workflow_id = req.workflow_id
                   AND open.status IN ('pending', 'running'))) AS started_run_id,
       ins.id IS NOT NULL AS created, wft.*, events.*
FROM req
LEFT JOIN ins ON true
LEFT JOIN wft ON true
LEFT JOIN events ON true;

-- name: start_workflows
-- Start runs in one statement (parallel arrays, in order: $3 one input per run, $1 their
-- workflow ids or none at all, $2 their types or the one type of them all, $4 the run ids the
-- requests ask for or none at all): each new run gets its workflow_started event and a pending
-- workflow task; a workflow id that already has an open run gets that run back (idempotent
-- start), and so does a run id asked for that exists, whatever its state (a retried request);
-- an empty or absent workflow id gets a generated UUID. Returns one row per request, in request
-- order.
WITH req AS MATERIALIZED (
    SELECT coalesce(r.run_id, gen_random_uuid()) AS run_id,
           CASE WHEN coalesce(r.workflow_id, '') = '' THEN gen_random_uuid()::text
                ELSE r.workflow_id END AS workflow_id,
           coalesce(r.workflow_type, ($2::text[])[1]) AS workflow_type, r.input, r.ord,
           CASE WHEN r.run_id IS NOT NULL THEN
               (SELECT x.id FROM durable_workflow_instances x WHERE x.id = r.run_id) END AS earlier
    FROM unnest($1::text[], $2::text[], $3::text[], $4::uuid[])
         WITH ORDINALITY AS r(workflow_id, workflow_type, input, run_id, ord)
), ins AS (
    INSERT INTO durable_workflow_instances (id, workflow_id, workflow_type, input, partition_key,
                                            last_sequence_num)
    SELECT run_id, workflow_id, workflow_type, input::json, workflow_id, 1 FROM req
    WHERE req.earlier IS NULL
    ON CONFLICT (workflow_id) WHERE status IN ('pending', 'running') DO NOTHING
    RETURNING id, workflow_id, workflow_type
), events AS (
    INSERT INTO durable_workflow_events (run_id, workflow_id, sequence_num, event_type, payload)
    SELECT ins.id, ins.workflow_id, 1, 'workflow_started',
           json_build_object('type', 'workflow_started', 'workflow_type', ins.workflow_type,
                             'workflow_id', ins.workflow_id, 'run_id', ins.id,
                             'input', req.input::json)
    FROM ins JOIN req ON req.run_id = ins.id
), wft AS (
    INSERT INTO durable_task_queue (id, run_id, workflow_id, kind, activity_type, max_attempts,
                                    partition_key)
    SELECT gen_random_uuid(), ins.id, ins.workflow_id, 'workflow', ins.workflow_type,
           2147483647, ins.workflow_id
    FROM ins
    RETURNING activity_type
), woke AS (
    SELECT count(*) AS n FROM (
        SELECT pg_notify('everruns_tasks', 'workflow:' || t || E'\t' || n)
        FROM (SELECT activity_type AS t, count(*) AS n FROM wft GROUP BY activity_type) d) x
)
-- The open run of a request that created nothing is looked up by index for that row only
-- (COALESCE stops at the first value): a join would read every open run.
SELECT req.ord, req.workflow_id,
       coalesce(mine.id, req.earlier, same.id,
                (SELECT open.id FROM durable_workflow_instances open
                 WHERE open.workflow_id = req.workflow_id
                   AND open.status IN ('pending', 'running'))) AS run_id,
       mine.id IS NOT NULL AS created
FROM req
LEFT JOIN ins mine ON mine.id = req.run_id
LEFT JOIN ins same ON mine.id IS NULL AND same.workflow_id = req.workflow_id
WHERE (SELECT n FROM woke) IS NOT NULL
ORDER BY req.ord;

-- name: lock_schedule
-- One schedule's row, locked (NULL: none).
SELECT * FROM durable_schedules WHERE id = $1 FOR UPDATE;

-- name: get_schedule
-- One schedule's row (NULL: none).
SELECT * FROM durable_schedules WHERE id = $1;

-- name: insert_schedule
-- Create a schedule unless its id is taken (then return nothing). NOTIFY wakes the
-- due-scanners, which sleep until the next firing they know of.
WITH s AS (
    INSERT INTO durable_schedules (id, spec, workflow_type, input, overlap, next_fire_at, paused)
    VALUES ($1, $2, $3, $4::json, $5, $6, $7)
    ON CONFLICT (id) DO NOTHING
    RETURNING *
)
SELECT s.* FROM s, LATERAL (SELECT pg_notify('everruns_timers', '')) n;

-- name: replace_schedule
-- Replace a schedule's definition (its row locked by the caller); what it fired so far, and
-- whether it is paused, stay.
WITH s AS (
    UPDATE durable_schedules
    SET spec = $2, workflow_type = $3, input = $4::json, overlap = $5, next_fire_at = $6,
        updated_at = now()
    WHERE id = $1
    RETURNING *
)
SELECT s.* FROM s, LATERAL (SELECT pg_notify('everruns_timers', '')) n;

-- name: pause_schedule
-- Pause a schedule ($2 true; $4: why, when the control plane pauses it) or resume it with its
-- next firing $3 (what it missed while paused is not fired).
WITH s AS (
    UPDATE durable_schedules
    SET paused = $2, next_fire_at = coalesce($3, next_fire_at), paused_reason = $4,
        updated_at = now()
    WHERE id = $1
    RETURNING *
)
SELECT s.* FROM s, LATERAL (SELECT pg_notify('everruns_timers', '')) n;

-- name: delete_schedule
-- Delete a schedule (the runs it started are left alone); NULL when there was none.
DELETE FROM durable_schedules WHERE id = $1 RETURNING id;

-- name: list_schedules
-- Schedules by id, after $1 (keyset paging), at most $2.
SELECT * FROM durable_schedules
WHERE ($1::text IS NULL OR id > $1)
ORDER BY id
LIMIT $2;

-- name: lock_due_schedules
-- Schedules that are not paused and were due by $2, in due order, at most $1; rows another
-- transaction holds (another control plane firing them) are skipped, never waited for.
SELECT * FROM durable_schedules
WHERE NOT paused AND next_fire_at <= $2
ORDER BY next_fire_at, id
LIMIT $1
FOR UPDATE SKIP LOCKED;

-- name: workflow_id_open
-- Whether a workflow id has an open run (a run that continued as new goes on under its id).
SELECT EXISTS (SELECT 1 FROM durable_workflow_instances
               WHERE workflow_id = $1 AND status IN ('pending', 'running'));

-- name: advance_schedule
-- Record a firing of a locked schedule: the run it started or found open under its workflow id
-- ($3 that id, $4 the run id, $5 the time it fired for: its due time, or now for a trigger;
-- $6 whether it started the run), or a firing skipped ($3 NULL); its next firing is $2.
-- Returns the row as recorded.
UPDATE durable_schedules
SET next_fire_at = $2,
    last_fired_at = CASE WHEN $3::text IS NULL THEN last_fired_at ELSE $5 END,
    last_workflow_id = coalesce($3, last_workflow_id),
    last_run_id = CASE WHEN $3::text IS NULL THEN last_run_id ELSE $4 END,
    fired_count = fired_count + CASE WHEN $6 THEN 1 ELSE 0 END,
    skipped_count = skipped_count + CASE WHEN $3::text IS NULL THEN 1 ELSE 0 END,
    updated_at = now()
WHERE id = $1
RETURNING *;
