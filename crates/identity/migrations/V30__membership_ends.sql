-- Whether a grant made the membership (false when the invitee was a member already), so that
-- revoking the invitation's access removes only what it granted.
ALTER TABLE identity.organization_grants ADD COLUMN created BOOLEAN NOT NULL DEFAULT TRUE;

-- Removals from an organization that keyring must hear of (to end the person's project and key
-- roles there), queued in the removal's transaction and retried until keyring has them.
CREATE TABLE identity.keyring_calls (
    id BIGSERIAL PRIMARY KEY,
    organization_id UUID NOT NULL,
    account_id UUID NOT NULL,
    removed_at TIMESTAMPTZ NOT NULL,
    attempts INT NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error TEXT,
    done_at TIMESTAMPTZ
);
CREATE INDEX keyring_calls_due ON identity.keyring_calls (next_attempt_at) WHERE done_at IS NULL;
