-- The change log and the records around it, as the server before
-- versioned migrations created them: every statement tolerates what an
-- older server already created, so a database of any earlier version
-- reaches this one.
CREATE TABLE IF NOT EXISTS pgrelay.change_history (
    lsn            pg_lsn      NOT NULL,
    ordinal        integer     NOT NULL,
    table_name     text        NOT NULL,
    operation      text        NOT NULL,
    data           json,
    old_data       json,
    transaction_id bigint      NOT NULL,
    commit_time    timestamptz NOT NULL,
    origin_client  text,
    schema_version integer     NOT NULL,
    PRIMARY KEY (lsn, ordinal)
);
COMMENT ON TABLE pgrelay.change_history IS
    'pgrelay change log: one row per captured change, in commit order (lsn = commit LSN, ordinal = position in the transaction)';
CREATE TABLE IF NOT EXISTS pgrelay.table_schemas (
    name    text PRIMARY KEY,
    version integer NOT NULL,
    schema  jsonb NOT NULL
);
CREATE TABLE IF NOT EXISTS pgrelay.applied_changes (
    client_id  text        NOT NULL,
    change_id  text        NOT NULL,
    tx_id      text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (client_id, change_id)
);
CREATE INDEX IF NOT EXISTS applied_changes_applied_at ON pgrelay.applied_changes (applied_at);
COMMENT ON TABLE pgrelay.applied_changes IS
    'pgrelay client writes: change ids applied, so a resent batch applies nothing twice (kept for the retention)';
CREATE TABLE IF NOT EXISTS pgrelay.log_state (
    id             integer PRIMARY KEY CHECK (id = 1),
    log_id         text    NOT NULL,
    pruned_through pg_lsn  NOT NULL DEFAULT '0/0'
);
INSERT INTO pgrelay.log_state (id, log_id) VALUES (1, gen_random_uuid()::text)
    ON CONFLICT (id) DO NOTHING;
COMMENT ON TABLE pgrelay.log_state IS
    'pgrelay change log identity (replicas of another log must re-hydrate) and the position through which it was pruned';
ALTER TABLE pgrelay.log_state ADD COLUMN IF NOT EXISTS new_epoch_from pg_lsn;
CREATE TABLE IF NOT EXISTS pgrelay.log_slots (slot_name text PRIMARY KEY);
COMMENT ON TABLE pgrelay.log_slots IS
    'pgrelay: the replication slots that feed this change log (one losing its slot starts a new log)';
COMMENT ON COLUMN pgrelay.log_state.new_epoch_from IS
    'set while a new change log is being started after a lost slot: where it begins';
