-- The open runs marked stuck (their workflow task failed: non-determinism, usually code that
-- changed under them), by workflow type. A worker that registers serving a type gives that
-- type's stuck runs another try (retry_stuck_runs): deploying compatible code resumes them
-- without an event sent to each. Only stuck runs are in it, so the look at every registration
-- reads nothing when none is stuck.
CREATE INDEX IF NOT EXISTS durable_workflow_instances_stuck
    ON durable_workflow_instances (workflow_type)
    WHERE stuck_reason IS NOT NULL AND status IN ('pending', 'running');
