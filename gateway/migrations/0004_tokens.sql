-- 0004: personal access tokens (SPEC §14) and single-use form tokens of the pages (SPEC §15).

CREATE TABLE tokens (
    id            bigserial PRIMARY KEY,
    hash          bytea NOT NULL UNIQUE CHECK (length(hash) = 32),  -- SHA-256 of the token; the token is never stored
    name          text NOT NULL CHECK (name <> ''),
    user_id       bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,  -- the owner, whose identity it carries
    created_by    text NOT NULL,                    -- the owner's login, or the administrator who made it
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    last_used_at  timestamptz,                      -- written at most once a minute, off the request path
    revoked_at    timestamptz
);
CREATE INDEX tokens_user ON tokens (user_id, created_at DESC);

-- The client addresses each token was used from: the first use from a new one is audited.
CREATE TABLE token_addresses (
    token_id  bigint NOT NULL REFERENCES tokens (id) ON DELETE CASCADE,
    address   text NOT NULL,
    first_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (token_id, address)
);

-- CSRF tokens of the pages' forms are single-use: a nonce is recorded when its form is accepted, and a
-- replay is refused on every replica. Rows older than the tokens' lifetime are deleted as forms arrive.
CREATE TABLE form_nonces (
    nonce    text PRIMARY KEY,
    used_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX form_nonces_used_at ON form_nonces (used_at);
