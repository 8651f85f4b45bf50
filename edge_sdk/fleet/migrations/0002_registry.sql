-- edge-sdk fleet database, migration 2: model registry, holdout sets, staged deployments and their decisions.
-- Portable SQL for SQLite and PostgreSQL; {autoid} and {blob} are replaced per dialect (see 0001). Times are unix
-- seconds; *_json columns hold JSON text.

CREATE TABLE models (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'candidate',        -- candidate | canary | active | retired
    bundle_sha256 TEXT NOT NULL,                    -- sha256 of the stored .tar.gz archive (what devices download)
    content_sha256 TEXT NOT NULL,                   -- sha256 of the bundle's files (names + contents), archive-independent
    archive_path TEXT NOT NULL,                     -- absolute path of the stored archive
    size_bytes BIGINT NOT NULL,                     -- archive size
    manifest TEXT NOT NULL,                         -- manifest.json as stored in the bundle
    lineage TEXT NOT NULL,                          -- JSON: source sha256/framework, converter + runtime versions per artifact
    validation TEXT NOT NULL,                       -- JSON: per artifact validation metrics from the manifest
    holdout_result TEXT,                            -- JSON: last evaluation on the registered holdout set
    signed_key_id TEXT,                             -- ed25519 key id of signature.json, NULL when unsigned
    signature_verified INTEGER NOT NULL DEFAULT 0,  -- 1 when the signature was checked against trusted keys at add
    created_at DOUBLE PRECISION NOT NULL,
    promoted_at DOUBLE PRECISION,
    force_reason TEXT,                              -- promote --force REASON (gate overridden)
    state_reason TEXT,
    updated_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (name, version)
);

CREATE TABLE model_transitions (                    -- every state change of a model version, with why
    id {autoid},
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    ts DOUBLE PRECISION NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    reason TEXT NOT NULL,
    figures TEXT                                    -- JSON (gate figures, deployment id ...)
);
CREATE INDEX model_transitions_model ON model_transitions (name, version, ts);

CREATE TABLE holdouts (                             -- one evaluation set per model name (re-registering replaces it)
    name TEXT PRIMARY KEY,
    path TEXT NOT NULL,                             -- copy of the .npz inside the registry store
    sha256 TEXT NOT NULL,
    samples BIGINT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);

CREATE TABLE deployments (
    id TEXT PRIMARY KEY,                            -- uuid4 hex, sent to devices as deployment_id
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    previous_version TEXT,                          -- what the fleet ran before (rollback target), NULL if unknown
    fleet TEXT NOT NULL,
    stages TEXT NOT NULL,                           -- cumulative percentages, e.g. "5,25,100"
    hold_s DOUBLE PRECISION NOT NULL,
    state TEXT NOT NULL,                            -- running | completed | halted | rolled_back
    stage_index INTEGER NOT NULL DEFAULT 0,
    stage_started_at DOUBLE PRECISION NOT NULL,
    next_check_at DOUBLE PRECISION NOT NULL,        -- tick evaluates the deployment from this time on
    devices TEXT,                                   -- JSON list when the deployment targets an explicit device list
    base_url TEXT NOT NULL,                         -- where devices download bundles
    thresholds TEXT NOT NULL,                       -- JSON: the health thresholds this deployment is judged by
    created_at DOUBLE PRECISION NOT NULL,
    finished_at DOUBLE PRECISION,
    reason TEXT
);
CREATE INDEX deployments_fleet_name ON deployments (fleet, name, state);

CREATE TABLE deployment_devices (
    deployment_id TEXT NOT NULL,
    device TEXT NOT NULL,
    stage_index INTEGER NOT NULL,                   -- the stage in which the device was sent the new version
    sent_at DOUBLE PRECISION NOT NULL,
    acked_version TEXT,                             -- model version the device last reported (devices table)
    acked_at DOUBLE PRECISION,
    rolled_back_at DOUBLE PRECISION,
    PRIMARY KEY (deployment_id, device)
);

CREATE TABLE rollout_decisions (
    id {autoid},
    deployment_id TEXT NOT NULL,
    ts DOUBLE PRECISION NOT NULL,
    stage_index INTEGER NOT NULL,
    decision TEXT NOT NULL,                         -- start | advance | hold | halt | rollback | complete
    figures TEXT NOT NULL,                          -- JSON: canary and reference figures, each check with its limit
    reason TEXT NOT NULL
);
CREATE INDEX rollout_decisions_deployment ON rollout_decisions (deployment_id, ts);
