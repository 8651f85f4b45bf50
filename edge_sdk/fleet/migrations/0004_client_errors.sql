-- edge-sdk fleet database, migration 4: client-input errors kept apart from model/runtime errors (issue 13).
-- Portable SQL for SQLite and PostgreSQL (see 0001).
-- errors stays the sum over every kind; client_errors is the part of it that the client's input caused (HTTP 4xx:
-- malformed request, undecodable image, wrong shape). Anyone who reaches a device's HTTP port can produce those,
-- so canary judgement and model error rates use errors - client_errors. Rows stored before this migration keep
-- 0 here; the canary reads the kinds from their payload instead.

ALTER TABLE windows ADD COLUMN client_errors BIGINT NOT NULL DEFAULT 0;
ALTER TABLE window_rollups ADD COLUMN client_errors BIGINT NOT NULL DEFAULT 0;
