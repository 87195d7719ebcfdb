-- The index of pending tasks by visibility holds only the tasks made visible later than they
-- were created (a retry's backoff, a release, a requeue): the ones the due scanner waits for
-- and announces when they become visible. Every other task is announced when it is written,
-- and the scanner's safety net finds a type whose next task waits too long through the claim
-- index. Over every pending task, this index was a second way to read the whole queue, which
-- PostgreSQL took, with statistics that showed no task waiting, for the safety net's walk of
-- the claim index; and every task written paid for an entry in it.

DROP INDEX IF EXISTS durable_task_queue_delayed;
CREATE INDEX IF NOT EXISTS durable_task_queue_deferred
    ON durable_task_queue (visible_at) WHERE status = 'pending' AND visible_at > created_at;
