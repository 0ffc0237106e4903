-- Whether a grant made the membership (false when the invitee was a member already), so that
-- revoking the invitation's access removes only what it granted.
ALTER TABLE keyring.grants ADD COLUMN created BOOLEAN NOT NULL DEFAULT TRUE;

-- Calls to the invitation service about one person's membership (an ended membership marks the
-- invitation that granted it): the account it is about.
ALTER TABLE keyring.pending_calls ADD COLUMN account_id UUID;
