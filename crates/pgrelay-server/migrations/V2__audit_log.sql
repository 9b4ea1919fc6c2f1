-- The audit trail, as the server before versioned migrations created it
-- (tolerating a table an older server already created).
CREATE TABLE IF NOT EXISTS pgrelay.audit_log (
    id        bigserial   PRIMARY KEY,
    at        timestamptz NOT NULL,
    action    text        NOT NULL,
    client_id text,
    subject   text,
    detail    text
);
CREATE INDEX IF NOT EXISTS audit_log_at ON pgrelay.audit_log (at);
COMMENT ON TABLE pgrelay.audit_log IS
    'pgrelay audit trail: connects, refusals, expired tokens, rejected writes, admin actions';
