-- The internal RPCs each of Keyshare's own service accounts may call (`keys.watch`, …),
-- written from configuration at every start. Organization service accounts have none.
ALTER TABLE identity.service_accounts ADD COLUMN scopes TEXT[] NOT NULL DEFAULT '{}';
