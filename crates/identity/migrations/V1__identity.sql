-- Identity's schema. Other services never read these tables; they call IdentityService.

CREATE TABLE identity.accounts (
    id UUID PRIMARY KEY,
    email TEXT NOT NULL,
    -- Lowercase email: uniqueness and lookups are case-insensitive.
    email_normalized TEXT NOT NULL UNIQUE,
    display_name TEXT NOT NULL,
    -- argon2id PHC string.
    password_hash TEXT NOT NULL,
    email_verified_at TIMESTAMPTZ,
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);

-- Single-use email verification tokens, stored as SHA-256.
CREATE TABLE identity.email_verifications (
    token_hash BYTEA PRIMARY KEY,
    account_id UUID NOT NULL REFERENCES identity.accounts (id) ON DELETE CASCADE,
    created_at TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    used_at TIMESTAMPTZ
);
CREATE INDEX email_verifications_account ON identity.email_verifications (account_id);

-- A login session: the chain of refresh tokens that started with one login.
CREATE TABLE identity.sessions (
    id UUID PRIMARY KEY,
    account_id UUID NOT NULL REFERENCES identity.accounts (id) ON DELETE CASCADE,
    created_at TIMESTAMPTZ NOT NULL,
    revoked_at TIMESTAMPTZ,
    revoked_reason TEXT
);
CREATE INDEX sessions_account ON identity.sessions (account_id) WHERE revoked_at IS NULL;

-- Refresh tokens, stored as SHA-256. Each works once; a used one presented again ends the
-- session (it was stolen, or the client is broken).
CREATE TABLE identity.refresh_tokens (
    token_hash BYTEA PRIMARY KEY,
    session_id UUID NOT NULL REFERENCES identity.sessions (id) ON DELETE CASCADE,
    issued_at TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    used_at TIMESTAMPTZ
);
CREATE INDEX refresh_tokens_session ON identity.refresh_tokens (session_id);

-- Failed logins per email (known or not, so throttling reveals nothing).
CREATE TABLE identity.login_throttle (
    email_normalized TEXT PRIMARY KEY,
    failures INT NOT NULL,
    window_started_at TIMESTAMPTZ NOT NULL,
    locked_until TIMESTAMPTZ
);

CREATE TABLE identity.organizations (
    id UUID PRIMARY KEY,
    display_name TEXT NOT NULL,
    created_by UUID REFERENCES identity.accounts (id) ON DELETE SET NULL,
    created_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE identity.organization_members (
    organization_id UUID NOT NULL REFERENCES identity.organizations (id) ON DELETE CASCADE,
    account_id UUID NOT NULL REFERENCES identity.accounts (id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('owner', 'reader')),
    created_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (organization_id, account_id)
);
-- Memberships granted for accepted invitations. Kept after the membership is removed, so a
-- retried grant neither adds a second membership nor brings back a revoked one.
CREATE TABLE identity.organization_grants (
    invitation_id TEXT PRIMARY KEY,
    organization_id UUID NOT NULL REFERENCES identity.organizations (id) ON DELETE CASCADE,
    account_id UUID NOT NULL REFERENCES identity.accounts (id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX organization_members_account ON identity.organization_members (account_id);
CREATE INDEX organization_members_page ON identity.organization_members (organization_id, created_at, account_id);

CREATE TABLE identity.service_accounts (
    id UUID PRIMARY KEY,
    -- NULL for Keyshare's own (internal) service accounts.
    organization_id UUID REFERENCES identity.organizations (id) ON DELETE CASCADE,
    display_name TEXT NOT NULL,
    client_id TEXT NOT NULL UNIQUE,
    -- SHA-256 of the client secret (32 random bytes: a slow hash adds nothing).
    secret_hash BYTEA NOT NULL,
    internal BOOLEAN NOT NULL DEFAULT FALSE,
    created_at TIMESTAMPTZ NOT NULL,
    deleted_at TIMESTAMPTZ
);
CREATE INDEX service_accounts_org ON identity.service_accounts (organization_id, created_at, id) WHERE deleted_at IS NULL;

-- Ed25519 keys that sign access tokens. The one with retire_at NULL signs; the others verify
-- until retire_at, when every token they signed has expired.
CREATE TABLE identity.signing_keys (
    kid TEXT PRIMARY KEY,
    public_key BYTEA NOT NULL,
    -- PKCS#8 private key sealed with AES-256-GCM under the key-encryption key kek_id.
    private_key_sealed BYTEA NOT NULL,
    kek_id TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    retire_at TIMESTAMPTZ
);
CREATE UNIQUE INDEX signing_keys_one_active ON identity.signing_keys ((TRUE)) WHERE retire_at IS NULL;
