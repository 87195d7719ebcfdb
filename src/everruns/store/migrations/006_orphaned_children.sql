-- A child run may outlive its parent's row: retention deletes ended runs, and a parent that
-- was cancelled ends before its children. The foreign key then sets the child's parent_run_id
-- to NULL, which the CHECK tying it to parent_child_id refused, and retention failed on every
-- round. The child keeps its child id; the CHECK now only requires a parent to name the child.
-- Every existing row met the stricter CHECK, so the new one is added NOT VALID: PostgreSQL
-- checks the rows written from now on and does not read the table under its exclusive lock.
DO $$
DECLARE
    name text;
BEGIN
    FOR name IN
        SELECT conname FROM pg_constraint
        WHERE conrelid = 'durable_workflow_instances'::regclass AND contype = 'c'
          AND pg_get_constraintdef(oid)
              = 'CHECK (((parent_run_id IS NULL) = (parent_child_id IS NULL)))'
    LOOP
        EXECUTE format('ALTER TABLE durable_workflow_instances DROP CONSTRAINT %I', name);
    END LOOP;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conrelid = 'durable_workflow_instances'::regclass
                     AND conname = 'durable_workflow_instances_parent_names_child') THEN
        ALTER TABLE durable_workflow_instances
            ADD CONSTRAINT durable_workflow_instances_parent_names_child
            CHECK (parent_run_id IS NULL OR parent_child_id IS NOT NULL) NOT VALID;
    END IF;
END $$;
