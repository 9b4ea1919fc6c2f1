-- Which token subject owns each client id (under --auth): a session or a
-- write under an id another subject owns is refused.
CREATE TABLE IF NOT EXISTS pgrelay.client_owners (
    client_id  text        PRIMARY KEY,
    subject    text        NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE pgrelay.client_owners IS
    'pgrelay client ids and the token subject that owns each (under --auth)';
