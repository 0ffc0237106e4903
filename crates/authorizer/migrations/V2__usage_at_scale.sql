-- Usage storage that stays fast as it grows:
-- - call logs partitioned by UTC day, so retention drops whole partitions (never a row-by-row
--   DELETE) and a read of recent calls touches recent partitions only;
-- - counts rolled up minute → hour → day as they are written, so a 90-day chart reads hundreds
--   of rows; each granularity has its own retention (days are kept for ever by default).

-- The name of the partition holding `day`'s call logs.
CREATE FUNCTION call_log_partition_name(day date) RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT 'call_logs_' || to_char(day, 'YYYYMMDD') $$;

-- Makes the partition holding `day`'s call logs unless it is there. Replicas may race to make
-- the same one: the lock (held until the caller's transaction ends) lets one make it.
CREATE FUNCTION ensure_call_log_partition(day date) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    name text := authorizer.call_log_partition_name(day);
BEGIN
    IF to_regclass(format('authorizer.%I', name)) IS NOT NULL THEN
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('authorizer.call_logs partitions'));
    EXECUTE format(
        'CREATE TABLE IF NOT EXISTS authorizer.%I PARTITION OF authorizer.call_logs FOR VALUES FROM (%L) TO (%L)',
        name,
        (day::timestamp AT TIME ZONE 'UTC'),
        ((day + 1)::timestamp AT TIME ZONE 'UTC')
    );
END
$$;

ALTER TABLE call_logs RENAME TO call_logs_unpartitioned;
ALTER INDEX call_logs_pkey RENAME TO call_logs_unpartitioned_pkey;
ALTER INDEX call_logs_key_time RENAME TO call_logs_unpartitioned_key_time;
DROP INDEX call_logs_time;

CREATE SEQUENCE call_log_ids AS bigint;
SELECT setval('call_log_ids', COALESCE((SELECT max(id) FROM call_logs_unpartitioned), 0) + 1, false);

-- One row per check of a known key (or a sample of the valid ones, see
-- KEYSHARE_CALL_LOG_SAMPLE), written in batches with COPY.
CREATE TABLE call_logs (
    id          bigint      NOT NULL DEFAULT nextval('call_log_ids'),
    time        timestamptz NOT NULL,
    project_id  uuid        NOT NULL,
    key_id      uuid        NOT NULL,
    environment smallint    NOT NULL,
    method      text        NOT NULL,
    path        text        NOT NULL,
    client_ip   inet,
    outcome     smallint    NOT NULL,
    http_status smallint    NOT NULL,
    PRIMARY KEY (time, id)
) PARTITION BY RANGE (time);
ALTER SEQUENCE call_log_ids OWNED BY call_logs.id;
CREATE INDEX call_logs_key_time ON call_logs (key_id, time DESC, id DESC);

DO $$
DECLARE
    day date;
BEGIN
    FOR day IN SELECT DISTINCT (time AT TIME ZONE 'UTC')::date FROM call_logs_unpartitioned LOOP
        PERFORM authorizer.ensure_call_log_partition(day);
    END LOOP;
END
$$;
INSERT INTO call_logs (id, time, project_id, key_id, environment, method, path, client_ip, outcome, http_status)
SELECT id, time, project_id, key_id, environment, method, path, client_ip, outcome, http_status
FROM call_logs_unpartitioned;
DROP TABLE call_logs_unpartitioned;

-- Minutes are pruned by age.
CREATE INDEX usage_minutes_minute ON usage_minutes (minute);

-- The same counts per UTC hour and per UTC day, added to in the same transaction as the minutes.
CREATE TABLE usage_hours (
    hour        timestamptz NOT NULL,
    project_id  uuid        NOT NULL,
    key_id      uuid        NOT NULL,
    environment smallint    NOT NULL,
    method      text        NOT NULL,
    outcome     smallint    NOT NULL,
    calls       bigint      NOT NULL CHECK (calls >= 0),
    PRIMARY KEY (key_id, hour, environment, method, outcome)
);
CREATE INDEX usage_hours_project ON usage_hours (project_id, hour);
CREATE INDEX usage_hours_hour ON usage_hours (hour);

CREATE TABLE usage_days (
    day         timestamptz NOT NULL,
    project_id  uuid        NOT NULL,
    key_id      uuid        NOT NULL,
    environment smallint    NOT NULL,
    method      text        NOT NULL,
    outcome     smallint    NOT NULL,
    calls       bigint      NOT NULL CHECK (calls >= 0),
    PRIMARY KEY (key_id, day, environment, method, outcome)
);
CREATE INDEX usage_days_project ON usage_days (project_id, day);
CREATE INDEX usage_days_day ON usage_days (day);

INSERT INTO usage_hours (hour, project_id, key_id, environment, method, outcome, calls)
SELECT date_trunc('hour', minute AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', project_id, key_id, environment, method,
       outcome, sum(calls)
FROM usage_minutes
GROUP BY 1, 2, 3, 4, 5, 6;
INSERT INTO usage_days (day, project_id, key_id, environment, method, outcome, calls)
SELECT date_trunc('day', minute AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', project_id, key_id, environment, method,
       outcome, sum(calls)
FROM usage_minutes
GROUP BY 1, 2, 3, 4, 5, 6;
