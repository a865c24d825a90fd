-- 0002: SPEC §11, continuous synchronization. One row per user whose GitLab grant the gateway keeps (or kept).
-- Append-only: never edit once released.

CREATE TABLE gitlab_grants (
    user_id        bigint PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    refresh_token  text,               -- Fernet-encrypted with session.secrets; NULL = no grant kept (no_grant)
    next_sync_at   timestamptz,        -- when the next re-check is due; NULL = nothing to do (no grant or no
                                       -- active session: the row is dormant until the next sign-in)
    confirmed_at   timestamptz,        -- when GitLab last confirmed the user's access (sign-in or re-check)
    failures       integer NOT NULL DEFAULT 0,   -- consecutive transient failures (sync_state retrying)
    last_error     text NOT NULL DEFAULT '',
    lease_owner    text,               -- the re-check holding this row; its claim ends at lease_until, so a
    lease_until    timestamptz,        -- crashed claimant's work is picked up by another process
    claimed_at     timestamptz,        -- when the current lease began: a request made during it is kept
    updated_at     timestamptz NOT NULL DEFAULT now()
);
-- The scheduler reads only due rows: its work follows the users with an active session, not the users table.
CREATE INDEX gitlab_grants_due ON gitlab_grants (next_sync_at) WHERE next_sync_at IS NOT NULL;

-- §11 "Case": a GitLab path equal to a local group name except for case is audited once per pair.
CREATE TABLE group_case_mismatches (
    group_id     bigint NOT NULL REFERENCES groups (id) ON DELETE CASCADE,
    gitlab_path  text NOT NULL,
    seen_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, gitlab_path)
);
