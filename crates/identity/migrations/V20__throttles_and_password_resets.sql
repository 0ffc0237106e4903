-- Attempt counters, one row per (bucket, subject), each updated by one atomic statement:
-- logins per email (`login-email`) and per client address (`login-address`), counted before
-- the password is checked, and account mails per address (`mail-address`). Kept for unknown
-- emails too, so throttling reveals nothing.
CREATE TABLE identity.throttles (
    bucket TEXT NOT NULL,
    subject TEXT NOT NULL,
    hits INT NOT NULL,
    window_started_at TIMESTAMPTZ NOT NULL,
    locked_until TIMESTAMPTZ,
    PRIMARY KEY (bucket, subject)
);
DROP TABLE identity.login_throttle;

-- Single-use tokens that set a new password (reset, or a resent verification), stored as
-- SHA-256. Using one also verifies the email: the mail proved the mailbox.
CREATE TABLE identity.password_resets (
    token_hash BYTEA PRIMARY KEY,
    account_id UUID NOT NULL REFERENCES identity.accounts (id) ON DELETE CASCADE,
    created_at TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    used_at TIMESTAMPTZ
);
CREATE INDEX password_resets_account ON identity.password_resets (account_id) WHERE used_at IS NULL;
