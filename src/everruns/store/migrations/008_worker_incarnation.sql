-- A worker's incarnation was named by its registration's time (started_at), which a worker
-- process registering again (its heartbeat found it unknown) moved: its cancellation stream
-- still named the first registration, and when it dropped, the tasks claimed since waited for
-- the stale rule. A worker now sends a token made once per run (Worker.run) with every
-- registration and stream; the row keeps the token of its current registration, and
-- started_at stays the time that incarnation first registered. NULL: registered by a worker
-- that sends no token (an older release), whose registrations are named by their time as
-- before. A nullable column without a default: no table rewrite, existing rows read NULL.
ALTER TABLE durable_workers
    ADD COLUMN IF NOT EXISTS incarnation text
    CHECK (incarnation IS NULL OR length(incarnation) BETWEEN 1 AND 256);
