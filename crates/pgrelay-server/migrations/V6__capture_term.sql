-- Which node captures each slot into the change log, in which term: every
-- append to the change log checks its term here in its own transaction, so
-- a capturer that lost its lock (a stale one) can never append.
CREATE TABLE IF NOT EXISTS pgrelay.capture (
    slot        text        PRIMARY KEY,
    term        bigint      NOT NULL,
    holder      text        NOT NULL,
    -- What the holder syncs (tables, rules, conflicts): nodes that disagree
    -- on one slot are refused.
    fingerprint text        NOT NULL,
    -- Everything PostgreSQL decoded before this position is in the change
    -- log: what followers may tell their clients is captured.
    captured    pg_lsn      NOT NULL DEFAULT '0/0',
    started_at  timestamptz NOT NULL DEFAULT now(),
    renewed_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE pgrelay.capture IS
    'pgrelay: the node capturing each replication slot and its fencing term';
