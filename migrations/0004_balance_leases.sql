-- Credit leases: several gateway nodes spend one balance through slices of it. `leased_nano`
-- is the sum of the nodes' slices (never more than the balance); each node's slice has a row
-- with an expiry the node renews. A ledger commit moves the balance, `leased_nano` and the
-- node's slice down together.
ALTER TABLE accounts ADD COLUMN leased_nano INTEGER NOT NULL DEFAULT 0;
CREATE TABLE account_leases (
    account_id  INTEGER NOT NULL REFERENCES accounts(id),
    node        TEXT    NOT NULL,
    amount_nano INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,   -- unix ms
    PRIMARY KEY (account_id, node)
) WITHOUT ROWID;
CREATE INDEX account_leases_expiry ON account_leases(expires_at);
