-- The authorizer's own schema: usage counters, call logs and the quota counters that survive a
-- restart. Nothing here is authoritative about keys: that is keyring's feed.
--
-- Environments and outcomes are stored as their keyshare.authorizer.v1 enum numbers
-- (environment: 1 sandbox, 2 production; outcome: 1 VALID … 10 QUOTA_EXCEEDED).

-- Checks counted per minute × key × environment × method × outcome. Every replica adds its
-- counts (INSERT … ON CONFLICT … calls + excluded.calls), so rows are totals across replicas.
CREATE TABLE usage_minutes (
    minute      timestamptz NOT NULL,
    project_id  uuid        NOT NULL,
    key_id      uuid        NOT NULL,
    environment smallint    NOT NULL,
    -- Upper-case HTTP method, or OTHER for anything else (bounded cardinality).
    method      text        NOT NULL,
    outcome     smallint    NOT NULL,
    calls       bigint      NOT NULL CHECK (calls >= 0),
    PRIMARY KEY (key_id, minute, environment, method, outcome)
);
CREATE INDEX usage_minutes_project ON usage_minutes (project_id, minute);

-- One row per check of a known key, written in batches with COPY.
CREATE TABLE call_logs (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    time        timestamptz NOT NULL,
    project_id  uuid        NOT NULL,
    key_id      uuid        NOT NULL,
    environment smallint    NOT NULL,
    method      text        NOT NULL,
    path        text        NOT NULL,
    client_ip   inet,
    outcome     smallint    NOT NULL,
    http_status smallint    NOT NULL
);
CREATE INDEX call_logs_key_time ON call_logs (key_id, time DESC, id DESC);
CREATE INDEX call_logs_time ON call_logs (time);

-- Calls charged to a key's daily quota (UTC days), per environment, across replicas.
CREATE TABLE key_daily_usage (
    key_id      uuid     NOT NULL,
    environment smallint NOT NULL,
    day         date     NOT NULL,
    used        bigint   NOT NULL CHECK (used >= 0),
    PRIMARY KEY (key_id, environment, day)
);

-- Calls charged to a project's monthly quota (UTC calendar months, `month` is the first day),
-- per environment, across replicas.
CREATE TABLE project_monthly_usage (
    project_id  uuid     NOT NULL,
    environment smallint NOT NULL,
    month       date     NOT NULL,
    used        bigint   NOT NULL CHECK (used >= 0),
    PRIMARY KEY (project_id, environment, month)
);

-- Batches already written, so a batch retried after an unknown outcome (the connection dropped
-- around COMMIT) is not counted twice. Pruned after a day.
CREATE TABLE usage_batches (
    id         uuid        PRIMARY KEY,
    written_at timestamptz NOT NULL
);
