-- The application's migrations (`pgrelay migrate`): which ran on this
-- database, the SQL clients run in their replicas, and how each client
-- fared with it.
CREATE TABLE IF NOT EXISTS pgrelay.app_migrations (
    version    bigint      PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE pgrelay.app_migrations IS
    'pgrelay migrate: the application migrations applied to this database (sha-256 of their files)';
CREATE TABLE IF NOT EXISTS pgrelay.client_migrations (
    version        bigint      PRIMARY KEY,
    name           text        NOT NULL,
    up_sql         text        NOT NULL,
    down_sql       text        NOT NULL,
    stored_at      timestamptz NOT NULL DEFAULT now(),
    rolled_back_at timestamptz
);
COMMENT ON TABLE pgrelay.client_migrations IS
    'pgrelay migrate: SQL that replicas run (client_up.sql / client_down.sql); rolled back ones are undone by clients that ran them';
CREATE TABLE IF NOT EXISTS pgrelay.client_migration_status (
    client_id  text        NOT NULL,
    version    bigint      NOT NULL,
    direction  text        NOT NULL,
    state      text        NOT NULL,
    error      text,
    attempts   integer     NOT NULL DEFAULT 1,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (client_id, version)
);
COMMENT ON TABLE pgrelay.client_migration_status IS
    'pgrelay: each client''s last report on each client migration (applied or failed, with the error and the attempts)';
