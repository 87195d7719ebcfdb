-- The open child runs whose cancellation has not been requested, by parent. A parent's end (or
-- its own cancellation) passes the request on to its open children without waiting for one
-- another transaction holds (a child's end holds the child, then waits for its parent); the
-- children it skips are cancelled right after, and each reclaim round looks for any left
-- behind (find_orphaned_children: the control plane stopped in between, say). It reads this
-- index, which holds only the open children with no cancel request, instead of every open run.
-- Its predicate is in a form that no statement finding a run by its key states (those say
-- `completed_at IS NULL` for an open run), so none of them reads it instead of the key.
CREATE INDEX IF NOT EXISTS durable_workflow_instances_uncancelled_children
    ON durable_workflow_instances (parent_run_id)
    WHERE status IN ('pending', 'running') AND cancel_requested_at IS NULL
      AND parent_child_id IS NOT NULL;
