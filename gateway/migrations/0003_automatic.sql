-- 0003: SPEC §12, automatic provisioning. Append-only: never edit once released.

-- Users created by an automatic provisioning run, before their first sign-in.
ALTER TABLE users DROP CONSTRAINT users_provisioned_by_check;
ALTER TABLE users ADD CONSTRAINT users_provisioned_by_check CHECK (provisioned_by IN ('jit', 'admin', 'gitlab'));

-- One row per applied or failed run (dry runs change nothing and are not recorded): the scheduler of every
-- replica reads the newest to know when the next run is due, and /metrics shows it whichever replica ran it.
CREATE TABLE automatic_runs (
    id            bigserial PRIMARY KEY,
    started_at    timestamptz NOT NULL,
    finished_at   timestamptz NOT NULL DEFAULT now(),
    ok            boolean NOT NULL,
    duration      float8 NOT NULL,          -- seconds, listing and applying
    gitlab_calls  integer NOT NULL,
    db_seconds    float8 NOT NULL DEFAULT 0,
    counts        jsonb NOT NULL DEFAULT '{}'::jsonb,   -- what the plan changed, by kind
    error         text NOT NULL DEFAULT ''
);
CREATE INDEX automatic_runs_newest ON automatic_runs (finished_at DESC);
