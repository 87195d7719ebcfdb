-- A run's unprocessed signals are found through durable_signals_by_run (002) and a filter on
-- processed_at. The partial index over every unprocessed signal, which this drops, served the
-- same lookups; but with statistics taken when no signal waited it looks empty, and PostgreSQL
-- then read it whole (every waiting signal of every run) to mark one run's signals processed,
-- in the statement that applies each workflow task's decisions. A run has few signals.

DROP INDEX IF EXISTS durable_signals_unprocessed;
