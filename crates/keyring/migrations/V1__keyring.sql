-- Keyring's schema. Other services never read these tables: the authorizer follows the change
-- feed through WatchKeys, everyone else calls KeyringService.

CREATE TABLE keyring.projects (
    id UUID PRIMARY KEY,
    organization_id UUID NOT NULL,
    display_name TEXT NOT NULL,
    sandbox_rate_limit BIGINT NOT NULL DEFAULT 0,
    sandbox_monthly_quota BIGINT NOT NULL DEFAULT 0,
    production_rate_limit BIGINT NOT NULL DEFAULT 0,
    production_monthly_quota BIGINT NOT NULL DEFAULT 0,
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX projects_org ON keyring.projects (organization_id, created_at, id);

CREATE TABLE keyring.project_members (
    project_id UUID NOT NULL REFERENCES keyring.projects (id) ON DELETE CASCADE,
    account_id UUID NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('owner', 'member')),
    created_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (project_id, account_id)
);
CREATE INDEX project_members_account ON keyring.project_members (account_id);

-- Memberships granted for accepted invitations, kept after removal so a retry cannot revive one.
CREATE TABLE keyring.grants (
    invitation_id TEXT PRIMARY KEY,
    target TEXT NOT NULL,
    account_id UUID NOT NULL,
    role TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL
);

-- A deleted key keeps this row (deleted_at set) so its usage history can still be authorised;
-- its credentials, settings and members are deleted.
CREATE TABLE keyring.keys (
    id UUID PRIMARY KEY,
    project_id UUID NOT NULL REFERENCES keyring.projects (id) ON DELETE CASCADE,
    display_name TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    created_by UUID,
    -- Idempotency of CreateKey: (created_by, request_id).
    request_id TEXT,
    version BIGINT NOT NULL DEFAULT 1,
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    deleted_at TIMESTAMPTZ
);
CREATE UNIQUE INDEX keys_name_unique ON keyring.keys (project_id, lower(display_name)) WHERE deleted_at IS NULL;
CREATE UNIQUE INDEX keys_request ON keyring.keys (created_by, request_id) WHERE request_id IS NOT NULL;
CREATE INDEX keys_project ON keyring.keys (project_id, created_at, id) WHERE deleted_at IS NULL;

CREATE TABLE keyring.key_environments (
    key_id UUID NOT NULL REFERENCES keyring.keys (id) ON DELETE CASCADE,
    environment TEXT NOT NULL CHECK (environment IN ('sandbox', 'production')),
    active BOOLEAN NOT NULL DEFAULT TRUE,
    can_create BOOLEAN NOT NULL,
    can_read BOOLEAN NOT NULL,
    can_update BOOLEAN NOT NULL,
    can_delete BOOLEAN NOT NULL,
    rate_limit BIGINT NOT NULL DEFAULT 0,
    daily_quota BIGINT NOT NULL DEFAULT 0,
    ip_allowlist TEXT[] NOT NULL DEFAULT '{}',
    expire_at TIMESTAMPTZ,
    PRIMARY KEY (key_id, environment)
);

-- Credentials: SHA-256 for lookup, an AES-256-GCM sealed copy for reveal. retired_at NULL is the
-- current credential; a later retired_at is a regenerated one still in its grace period.
CREATE TABLE keyring.credentials (
    id UUID PRIMARY KEY,
    key_id UUID NOT NULL REFERENCES keyring.keys (id) ON DELETE CASCADE,
    environment TEXT NOT NULL CHECK (environment IN ('sandbox', 'production')),
    sha256 BYTEA NOT NULL UNIQUE,
    sealed BYTEA NOT NULL,
    kek_id TEXT NOT NULL,
    prefix TEXT NOT NULL,
    last_four TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    retired_at TIMESTAMPTZ
);
CREATE UNIQUE INDEX credentials_current ON keyring.credentials (key_id, environment) WHERE retired_at IS NULL;

CREATE TABLE keyring.key_members (
    key_id UUID NOT NULL REFERENCES keyring.keys (id) ON DELETE CASCADE,
    account_id UUID NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('owner', 'admin', 'contributor')),
    created_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (key_id, account_id)
);
CREATE INDEX key_members_account ON keyring.key_members (account_id, created_at, key_id);
CREATE UNIQUE INDEX key_members_one_owner ON keyring.key_members (key_id) WHERE role = 'owner';

CREATE TABLE keyring.audit_events (
    id BIGSERIAL PRIMARY KEY,
    project_id UUID NOT NULL,
    key_id UUID,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    request_id TEXT NOT NULL DEFAULT '',
    created_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX audit_project ON keyring.audit_events (project_id, id DESC);
CREATE INDEX audit_key ON keyring.audit_events (key_id, id DESC) WHERE key_id IS NOT NULL;

-- The change feed. Writers take a transaction-scoped advisory lock before drawing a sequence
-- number, so sequence order is commit order and a reader that has seen N has seen everything
-- before N. Each row holds the full state after the change.
CREATE SEQUENCE keyring.change_seq;
CREATE TABLE keyring.changes (
    seq BIGINT PRIMARY KEY,
    event JSONB NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Calls to other services that must happen after a commit (e.g. revoking a deleted key's
-- invitations), retried until they succeed.
CREATE TABLE keyring.pending_calls (
    id BIGSERIAL PRIMARY KEY,
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    attempts INT NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error TEXT,
    done_at TIMESTAMPTZ,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX pending_calls_due ON keyring.pending_calls (next_attempt_at) WHERE done_at IS NULL;

-- How far the feed was pruned: a watcher asking for an older sequence gets a snapshot.
CREATE TABLE keyring.feed_state (pruned_through BIGINT NOT NULL);
INSERT INTO keyring.feed_state VALUES (0);
