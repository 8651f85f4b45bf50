-- edge-sdk fleet database, migration 3: retention (hourly rollups, a summary of what was dropped), one window
-- per (stream, seq), indexes for age-based deletes. Portable SQL for SQLite and PostgreSQL (see 0001).

-- a device could store two windows with the same (stream, seq) under different window_ids: keep the first
DELETE FROM windows WHERE EXISTS (
    SELECT 1 FROM windows w2 WHERE w2.stream = windows.stream AND w2.seq = windows.seq
    AND w2.window_id < windows.window_id);
DROP INDEX windows_stream_seq;
CREATE UNIQUE INDEX windows_stream_seq ON windows (stream, seq);
CREATE INDEX windows_received ON windows (received_at);

CREATE TABLE window_rollups (                       -- raw windows older than the raw retention, per hour
    fleet TEXT NOT NULL,
    device TEXT NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    hour_ts DOUBLE PRECISION NOT NULL,              -- start of the hour (of the windows' end_ts)
    windows BIGINT NOT NULL,
    count BIGINT NOT NULL,
    errors BIGINT NOT NULL,
    fb_labelled BIGINT NOT NULL DEFAULT 0,
    fb_correct BIGINT NOT NULL DEFAULT 0,
    dropped_windows BIGINT NOT NULL DEFAULT 0,      -- outbox drops reported by the device (max per stream, summed)
    conf_sum DOUBLE PRECISION NOT NULL DEFAULT 0,   -- confidence mean x weight, summed (mean = conf_sum / conf_weight)
    conf_weight DOUBLE PRECISION NOT NULL DEFAULT 0,
    psi_max DOUBLE PRECISION,
    first_end_ts DOUBLE PRECISION NOT NULL,
    last_end_ts DOUBLE PRECISION NOT NULL,
    p50_ms DOUBLE PRECISION,                        -- from the merged sketch
    p95_ms DOUBLE PRECISION,
    p99_ms DOUBLE PRECISION,
    sketch TEXT,                                    -- merged DDSketch JSON: later merges stay exact
    updated_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (fleet, device, model_name, model_version, hour_ts)
);
CREATE INDEX window_rollups_hour ON window_rollups (hour_ts);

CREATE TABLE retention_drops (                      -- what retention deleted without a rollup, counted
    kind TEXT NOT NULL,                             -- event | dead_letter
    fleet TEXT NOT NULL,                            -- '' when the dead letter's topic names none
    device TEXT NOT NULL,
    reason TEXT NOT NULL,                           -- event kind, or dead-letter reason
    dropped BIGINT NOT NULL,
    first_ts DOUBLE PRECISION NOT NULL,             -- received_at of the oldest / newest dropped row
    last_ts DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (kind, fleet, device, reason)
);

CREATE INDEX events_received ON events (received_at);
CREATE INDEX dead_letters_received ON dead_letters (received_at);
