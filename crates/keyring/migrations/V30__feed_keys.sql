-- A key's credentials, found by key: reading a key's state for the change feed (every key write
-- does) and the cascade when a key is deleted. The only index by key was the partial one on
-- current credentials, so each of those scanned every credential: 0.2 s a write at a million keys.
CREATE INDEX credentials_key ON keyring.credentials (key_id);

-- Every live key's state as the change feed carries it: the payload of its last KeyUpserted
-- event. A snapshot for the authorizer is then one scan of this table, streamed as it is read,
-- instead of a join of keys, environments and credentials sorted by key (seconds at a million
-- keys before the first row).
CREATE TABLE keyring.feed_keys (
    key_id UUID PRIMARY KEY REFERENCES keyring.keys (id) ON DELETE CASCADE,
    -- JSON, not JSONB: a snapshot sends the text as it is, without converting a million
    -- documents back to text (JSONB took 7.0 s to SERVING at a million keys, JSON 5.1 s).
    state JSON NOT NULL
);

-- Kept by the change feed itself: whatever records a key's change, in the same transaction,
-- also replaces or removes its row here. A trigger rather than the application, so that a
-- replica still running the previous release during a rolling upgrade keeps the table true too.
CREATE FUNCTION keyring.keep_feed_keys() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.event ? 'KeyUpserted' THEN
        INSERT INTO keyring.feed_keys (key_id, state)
        VALUES ((NEW.event #>> '{KeyUpserted,key}')::uuid, (NEW.event -> 'KeyUpserted')::json)
        ON CONFLICT (key_id) DO UPDATE SET state = excluded.state;
    ELSIF NEW.event ? 'KeyRemoved' THEN
        DELETE FROM keyring.feed_keys WHERE key_id = (NEW.event #>> '{KeyRemoved,key}')::uuid;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER changes_keep_feed_keys AFTER INSERT ON keyring.changes
    FOR EACH ROW EXECUTE FUNCTION keyring.keep_feed_keys();

-- The keys that existed before, in the same transaction: creating the trigger locks the feed
-- against new changes until this commits, so no change falls between the fill and the trigger.
-- (The keyring tests run this statement again and check that it agrees with the feed.)
INSERT INTO keyring.feed_keys (key_id, state)
SELECT k.id,
       json_build_object(
           'project', k.project_id,
           'key', k.id,
           'credentials', coalesce(
               json_agg(
                   json_build_object(
                       'sha256', encode(c.sha256, 'hex'),
                       'environment', c.environment,
                       'active', e.active,
                       'permissions', json_build_object(
                           'create', e.can_create, 'read', e.can_read,
                           'update', e.can_update, 'delete', e.can_delete),
                       'rate_limit', e.rate_limit,
                       'daily_quota', e.daily_quota,
                       'ip_allowlist', to_json(e.ip_allowlist),
                       'expire_at', e.expire_at,
                       'grace_end', c.retired_at)
                   ORDER BY c.environment, c.created_at
               ) FILTER (WHERE c.id IS NOT NULL),
               '[]'::json))
FROM keyring.keys k
LEFT JOIN (keyring.credentials c
           JOIN keyring.key_environments e ON e.key_id = c.key_id AND e.environment = c.environment)
       ON c.key_id = k.id AND (c.retired_at IS NULL OR c.retired_at > now())
WHERE k.deleted_at IS NULL
GROUP BY k.id
ON CONFLICT (key_id) DO NOTHING;
