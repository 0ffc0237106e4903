-- Sessions that ended, for the services that verify access tokens on their own: they follow
-- WatchSessionRevocations and refuse the tokens of these sessions until those have expired.
-- A trigger writes the rows, so every way a session ends (logout, password change or reset,
-- refresh-token reuse, an unverified account replaced) is covered without each caller knowing.
CREATE TABLE identity.session_revocations (
    seq BIGSERIAL PRIMARY KEY,
    session_id UUID NOT NULL,
    account_id UUID NOT NULL,
    revoked_at TIMESTAMPTZ NOT NULL,
    -- The transaction that wrote the row. Rows commit out of sequence order; a reader that
    -- re-reads from the oldest transaction still running at its previous read misses none.
    written_by XID8 NOT NULL DEFAULT pg_current_xact_id()
);
CREATE INDEX session_revocations_revoked_at ON identity.session_revocations (revoked_at);
CREATE INDEX session_revocations_written_by ON identity.session_revocations (written_by);

CREATE FUNCTION identity.record_session_revocation() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        -- A session deleted with its account (an unverified account replaced by a new sign-up).
        IF OLD.revoked_at IS NOT NULL THEN
            RETURN NULL;
        END IF;
        INSERT INTO identity.session_revocations (session_id, account_id, revoked_at)
        VALUES (OLD.id, OLD.account_id, now());
    ELSIF OLD.revoked_at IS NULL AND NEW.revoked_at IS NOT NULL THEN
        INSERT INTO identity.session_revocations (session_id, account_id, revoked_at)
        VALUES (NEW.id, NEW.account_id, NEW.revoked_at);
    ELSE
        RETURN NULL;
    END IF;
    -- Identical notifications of one transaction are delivered once, at commit.
    PERFORM pg_notify('identity_session_revocations', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER sessions_revoked
    AFTER UPDATE OF revoked_at OR DELETE ON identity.sessions
    FOR EACH ROW EXECUTE FUNCTION identity.record_session_revocation();
