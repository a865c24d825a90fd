-- 0001: the core tables of SPEC §10. Append-only: never edit once released; add 0002_... instead.

CREATE TABLE users (
    id              bigserial PRIMARY KEY,
    gitlab_id       bigint UNIQUE,                      -- the identity key: usernames and emails change
    login           text NOT NULL CHECK (login <> ''),
    name            text NOT NULL DEFAULT '',
    email           text NOT NULL DEFAULT '',
    active          boolean NOT NULL DEFAULT true,
    provisioned_by  text NOT NULL CHECK (provisioned_by IN ('jit', 'admin')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_login_at   timestamptz,
    last_sync_at    timestamptz
);
-- GitLab usernames are unique case-insensitively; so are our logins (two rows can't race to one name).
CREATE UNIQUE INDEX users_login_ci ON users (lower(login));

CREATE TABLE groups (
    id               bigserial PRIMARY KEY,
    name             text NOT NULL UNIQUE CHECK (name <> ''),   -- case-sensitive, like the sync rule
    description      text NOT NULL DEFAULT '',
    gitlab_group_id  bigint UNIQUE,                               -- bound at the first match (SPEC §5 rule 7)
    builtin          boolean NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE memberships (
    user_id   bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    group_id  bigint NOT NULL REFERENCES groups (id) ON DELETE CASCADE,
    source    text NOT NULL CHECK (source IN ('sync', 'manual', 'default')),
    added_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, group_id)
);
CREATE INDEX memberships_group ON memberships (group_id);

CREATE TABLE sessions (
    id            text PRIMARY KEY,                 -- random, 32 bytes url-safe; also inside the cookie
    user_id       bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    last_seen_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz,
    user_agent    text NOT NULL DEFAULT '',
    client_ip     text NOT NULL DEFAULT ''
);
CREATE INDEX sessions_user_active ON sessions (user_id) WHERE revoked_at IS NULL;

CREATE TABLE audit_events (
    id       bigserial PRIMARY KEY,
    at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor    text NOT NULL,
    action   text NOT NULL,
    subject  text NOT NULL DEFAULT '',
    details  jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX audit_events_at ON audit_events (at DESC, id DESC);
CREATE INDEX audit_events_actor ON audit_events (lower(actor));
CREATE INDEX audit_events_subject ON audit_events (lower(subject));

-- The default group of SPEC §3 (provisioning.default_group). Its name follows the configuration: the
-- gateway renames the builtin row at start-up when the configured name differs.
INSERT INTO groups (name, description, builtin)
VALUES ('gateway-users', 'Every provisioned user; never touched by group sync', true);
