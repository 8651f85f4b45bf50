-- edge-sdk fleet database, migration 1: telemetry, devices, events, alerts, dead letters.
-- Portable SQL for SQLite and PostgreSQL; {autoid} and {blob} are replaced per dialect
-- (SQLite: INTEGER PRIMARY KEY / BLOB, PostgreSQL: BIGSERIAL PRIMARY KEY / BYTEA). Times are unix seconds.

CREATE TABLE devices (
    fleet TEXT NOT NULL,
    device TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'unknown',          -- online | offline | unknown
    state_ts DOUBLE PRECISION,                      -- when the state last changed (status message ts)
    state_reason TEXT,
    first_seen DOUBLE PRECISION NOT NULL,
    last_seen DOUBLE PRECISION NOT NULL,            -- last message of any kind (received_at)
    model_name TEXT,
    model_version TEXT,
    artifact TEXT,
    runtime TEXT,
    agent_version TEXT,
    window_s DOUBLE PRECISION,
    PRIMARY KEY (fleet, device)
);

CREATE TABLE windows (
    window_id TEXT PRIMARY KEY,                     -- idempotency key
    fleet TEXT NOT NULL,
    device TEXT NOT NULL,
    stream TEXT NOT NULL,
    seq BIGINT NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    start_ts DOUBLE PRECISION NOT NULL,
    end_ts DOUBLE PRECISION NOT NULL,
    received_at DOUBLE PRECISION NOT NULL,
    count BIGINT NOT NULL,
    errors BIGINT NOT NULL,                         -- sum over kinds; the kinds are in payload
    p50_ms DOUBLE PRECISION,
    p95_ms DOUBLE PRECISION,
    p99_ms DOUBLE PRECISION,
    conf_mean DOUBLE PRECISION,
    psi_max DOUBLE PRECISION,
    fb_labelled BIGINT NOT NULL DEFAULT 0,
    fb_correct BIGINT NOT NULL DEFAULT 0,
    dropped_windows BIGINT NOT NULL DEFAULT 0,
    payload TEXT NOT NULL                           -- the validated JSON window (sketch, histograms, health)
);
CREATE INDEX windows_device_end ON windows (fleet, device, end_ts);
CREATE INDEX windows_stream_seq ON windows (stream, seq);
CREATE INDEX windows_end ON windows (end_ts);

CREATE TABLE streams (                              -- one per device outbox; drives gap repair (cmd/resend)
    stream TEXT PRIMARY KEY,
    fleet TEXT NOT NULL,
    device TEXT NOT NULL,
    contiguous_seq BIGINT NOT NULL DEFAULT 0,       -- every seq <= this one is stored (or declared lost)
    max_seq BIGINT NOT NULL DEFAULT 0,
    lost BIGINT NOT NULL DEFAULT 0,                 -- seqs the device could no longer resend
    resend_requests BIGINT NOT NULL DEFAULT 0,
    last_resend_at DOUBLE PRECISION,
    updated_at DOUBLE PRECISION NOT NULL
);

CREATE TABLE events (
    event_id TEXT PRIMARY KEY,
    fleet TEXT NOT NULL,
    device TEXT NOT NULL,
    ts DOUBLE PRECISION NOT NULL,
    received_at DOUBLE PRECISION NOT NULL,
    kind TEXT NOT NULL,
    level TEXT NOT NULL DEFAULT 'info',
    data TEXT NOT NULL
);
CREATE INDEX events_device_ts ON events (fleet, device, ts);

CREATE TABLE dead_letters (
    id {autoid},
    received_at DOUBLE PRECISION NOT NULL,
    topic TEXT NOT NULL,
    reason TEXT NOT NULL,
    payload {blob} NOT NULL
);

CREATE TABLE alerts (
    id {autoid},
    fleet TEXT NOT NULL,
    device TEXT,                                    -- NULL for fleet-wide alerts
    rule TEXT NOT NULL,                             -- drift | latency_sla | error_rate | confidence_drop | offline | ...
    severity TEXT NOT NULL DEFAULT 'warning',
    state TEXT NOT NULL DEFAULT 'open',             -- open | resolved
    opened_at DOUBLE PRECISION NOT NULL,
    resolved_at DOUBLE PRECISION,
    model_version TEXT,
    value DOUBLE PRECISION,
    threshold DOUBLE PRECISION,
    message TEXT NOT NULL,
    webhook_status TEXT                             -- NULL (no webhook) | 'sent 200' | 'failed: ...'
);
CREATE INDEX alerts_open ON alerts (state, fleet, device, rule);
