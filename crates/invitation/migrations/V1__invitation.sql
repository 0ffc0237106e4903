-- Invitation's schema. Memberships themselves live in identity and keyring; this service asks
-- them to grant and remove, through the calls table.

CREATE TABLE invitation.invitations (
    id UUID PRIMARY KEY,
    -- organizations/{id}, projects/{id} or projects/{id}/keys/{id}
    target TEXT NOT NULL,
    email TEXT NOT NULL,
    email_normalized TEXT NOT NULL,
    role TEXT NOT NULL,
    -- 'expired' is not stored: a pending invitation past expires_at is expired.
    status TEXT NOT NULL CHECK (status IN ('pending', 'accepted', 'revoked')),
    inviter UUID NOT NULL,
    -- SHA-256 of the current acceptance token.
    token_hash BYTEA NOT NULL UNIQUE,
    created_at TIMESTAMPTZ NOT NULL,
    sent_at TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    accepted_at TIMESTAMPTZ,
    accepted_by UUID,
    revoked_at TIMESTAMPTZ
);
-- One open (pending or expired) invitation per email and target: resend that one instead.
CREATE UNIQUE INDEX invitations_one_open ON invitation.invitations (target, email_normalized) WHERE status = 'pending';
CREATE INDEX invitations_target ON invitation.invitations (target, created_at DESC, id DESC);
CREATE INDEX invitations_email ON invitation.invitations (email_normalized) WHERE status = 'pending';

-- Tokens replaced by a resend, so an old link gets a clear answer.
CREATE TABLE invitation.superseded_tokens (
    token_hash BYTEA PRIMARY KEY,
    invitation_id UUID NOT NULL REFERENCES invitation.invitations (id) ON DELETE CASCADE
);

-- Grants and removals to carry out in identity or keyring, in order per invitation, retried
-- until they succeed. Each call is idempotent (keyed by the invitation id).
CREATE TABLE invitation.calls (
    id BIGSERIAL PRIMARY KEY,
    invitation_id UUID NOT NULL REFERENCES invitation.invitations (id) ON DELETE CASCADE,
    kind TEXT NOT NULL CHECK (kind IN ('grant', 'remove')),
    attempts INT NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error TEXT,
    done_at TIMESTAMPTZ,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX calls_due ON invitation.calls (next_attempt_at) WHERE done_at IS NULL;
CREATE INDEX calls_invitation ON invitation.calls (invitation_id, id) WHERE done_at IS NULL;
