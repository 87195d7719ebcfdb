-- A run may end continued_as_new (ctx.continue_as_new): its workflow id goes on in a new run,
-- started in the same transaction, which continued_run_id names. The status CHECK and the one
-- tying an end time to the ended statuses take the new status. Both new CHECKs are looser
-- than the old ones, which every row met, so they are added NOT VALID: PostgreSQL checks the
-- rows written from now on and does not read the table under its exclusive lock. The new
-- column has no default: no table rewrite.
ALTER TABLE durable_workflow_instances ADD COLUMN IF NOT EXISTS continued_run_id uuid;
DO $$
DECLARE
    name text;
BEGIN
    FOR name IN
        SELECT conname FROM pg_constraint
        WHERE conrelid = 'durable_workflow_instances'::regclass AND contype = 'c'
          -- the two that list the statuses: the status CHECK and the end time's
          AND pg_get_constraintdef(oid) LIKE '%''cancelled''%'
          AND pg_get_constraintdef(oid) NOT LIKE '%continued_as_new%'
    LOOP
        EXECUTE format('ALTER TABLE durable_workflow_instances DROP CONSTRAINT %I', name);
    END LOOP;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conrelid = 'durable_workflow_instances'::regclass
                     AND conname = 'durable_workflow_instances_run_status') THEN
        ALTER TABLE durable_workflow_instances
            ADD CONSTRAINT durable_workflow_instances_run_status
            CHECK (status IN ('pending', 'running', 'completed', 'failed', 'cancelled',
                              'continued_as_new')) NOT VALID;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conrelid = 'durable_workflow_instances'::regclass
                     AND conname = 'durable_workflow_instances_ended_at') THEN
        ALTER TABLE durable_workflow_instances
            ADD CONSTRAINT durable_workflow_instances_ended_at
            CHECK ((status IN ('completed', 'failed', 'cancelled', 'continued_as_new'))
                   = (completed_at IS NOT NULL)) NOT VALID;
    END IF;
END $$;
