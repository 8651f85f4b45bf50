-- edge-sdk fleet database, migration 5: data samples captured on devices (issue 18). The bytes are files in the
-- collector's samples folder, content-addressed (<dir>/<sha256[:2]>/<sha256>.<ext>); this is their index.
-- Portable SQL for SQLite and PostgreSQL (see 0001). Times are unix seconds.

CREATE TABLE samples (
    fleet TEXT NOT NULL,
    sha256 TEXT NOT NULL,                           -- of the bytes as uploaded (the file's name)
    device TEXT NOT NULL,                           -- the device that uploaded it first
    ext TEXT NOT NULL,                              -- png | jpg | npy (from the content)
    size_bytes BIGINT NOT NULL,
    path TEXT NOT NULL,                             -- absolute path of the file
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    prediction INTEGER,                             -- predicted class index (NULL: not a classifier)
    confidence DOUBLE PRECISION,
    label INTEGER,                                  -- true class index, NULL until labelled
    label_source TEXT,                              -- feedback | import
    labelled_at DOUBLE PRECISION,
    policy TEXT NOT NULL,                           -- random | low_confidence | drift | feedback_disagree
    captured_at DOUBLE PRECISION NOT NULL,          -- on the device
    received_at DOUBLE PRECISION NOT NULL,          -- by the collector (retention counts from here)
    PRIMARY KEY (fleet, sha256)
);
CREATE INDEX samples_fleet_captured ON samples (fleet, captured_at);
CREATE INDEX samples_sha256 ON samples (sha256);
CREATE INDEX samples_received ON samples (received_at);
