-- A breaker opens when its last failure_threshold failures fit in the window (DESIGN §5: "5
-- failures in a 60 s window"). The window used to tumble: it began at a failure and a later one
-- past its end began the next, so five failures within five seconds that straddled two windows
-- did not open it. The row now keeps the times of the failures still in the window. Rows written
-- before start with none: a breaker counting failures in a tumbling window when this runs needs
-- up to failure_threshold more before it opens.
ALTER TABLE durable_circuit_breaker_state
    ADD COLUMN IF NOT EXISTS recent_failures timestamptz[] NOT NULL DEFAULT '{}';
