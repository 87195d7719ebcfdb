-- What a run's cancel request or end skipped because another transaction held its row: an
-- activity task of the run (a heartbeat, a result on its way held it), or an open child run (its
-- own end held it). Each row is written by the transaction that skipped, so it exists exactly
-- when that skip committed. The control plane cancels what was skipped once its row is free and
-- deletes the record in the same transaction (`Engine.cancel_if_abandoned`,
-- `Engine.cancel_if_orphaned`). The reclaim round's sweeps read these records (and the children
-- whose parent is gone) where they used to read every open activity task and every open child
-- each round: 459 and 478 ms for 100,000 of them on PostgreSQL 15.
-- No foreign key to what was skipped: checking one would take a key-share lock on the very row
-- the skip did not wait for. `run_id` is the run that skipped (for a child, its parent); deleting
-- it deletes the record, as it deletes its tasks.
CREATE TABLE IF NOT EXISTS durable_skipped_cancels (
    row_id     uuid PRIMARY KEY,
    kind       text NOT NULL CHECK (kind IN ('activity', 'child')),
    run_id     uuid NOT NULL REFERENCES durable_workflow_instances (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS durable_skipped_cancels_run ON durable_skipped_cancels (run_id);
-- What an earlier release's control plane skipped and did not come back to (it stopped before
-- its follow-up) is put on record once, by the rules its sweeps applied: an open activity task,
-- unflagged and not requeued, whose run ended or had its cancellation requested after the
-- activity was scheduled; an open child with no cancel request whose parent ended or had its
-- cancellation requested after the child started.
INSERT INTO durable_skipped_cancels (row_id, kind, run_id)
SELECT t.id, 'activity', t.run_id
FROM durable_task_queue t
JOIN durable_workflow_instances r ON r.id = t.run_id
WHERE t.kind = 'activity' AND t.status IN ('pending', 'claimed')
  AND t.cancel_requested_at IS NULL AND t.requeue_count = 0
  AND (r.completed_at IS NOT NULL
       OR (r.cancel_requested_at IS NOT NULL
           AND (SELECT min(c.sequence_num) FROM durable_workflow_events c
                WHERE c.run_id = t.run_id AND c.event_type = 'workflow_cancel_requested')
             > (SELECT min(s.sequence_num) FROM durable_workflow_events s
                WHERE s.run_id = t.run_id AND s.event_type = 'activity_scheduled'
                  AND s.payload->>'activity_id' = t.activity_id)))
ON CONFLICT (row_id) DO NOTHING;
INSERT INTO durable_skipped_cancels (row_id, kind, run_id)
SELECT c.id, 'child', c.parent_run_id
FROM durable_workflow_instances c
JOIN durable_workflow_instances p ON p.id = c.parent_run_id
WHERE c.status IN ('pending', 'running') AND c.cancel_requested_at IS NULL
  AND (p.completed_at IS NOT NULL OR c.created_at < p.cancel_requested_at)
ON CONFLICT (row_id) DO NOTHING;
