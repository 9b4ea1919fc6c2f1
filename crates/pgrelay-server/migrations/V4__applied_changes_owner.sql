-- Applied change ids are kept per token subject too (under --auth): a
-- token of another subject cannot pre-record the change ids of a client id
-- it does not own, and so cannot make the owner's write answer "duplicate".
-- Rows from before (and every row without --auth) have the subject ''.
ALTER TABLE pgrelay.applied_changes ADD COLUMN IF NOT EXISTS subject text NOT NULL DEFAULT '';
ALTER TABLE pgrelay.applied_changes DROP CONSTRAINT IF EXISTS applied_changes_pkey;
ALTER TABLE pgrelay.applied_changes ADD PRIMARY KEY (subject, client_id, change_id);
