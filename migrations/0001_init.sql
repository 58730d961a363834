-- Accounts hold a prepaid balance; keys belong to accounts. Money is integer nano-USD.
CREATE TABLE accounts (
    id            INTEGER PRIMARY KEY,
    name          TEXT    NOT NULL UNIQUE,
    grp           TEXT    NOT NULL DEFAULT 'default',
    balance_nano  INTEGER NOT NULL DEFAULT 0 CHECK (balance_nano >= 0),
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);

-- Only the SHA-256 of a secret key is stored, with a short prefix for display.
CREATE TABLE api_keys (
    id            INTEGER PRIMARY KEY,
    account_id    INTEGER NOT NULL REFERENCES accounts(id),
    name          TEXT    NOT NULL DEFAULT '',
    prefix        TEXT    NOT NULL,
    hash          BLOB    NOT NULL UNIQUE,
    revoked_at    INTEGER,
    expires_at    INTEGER,
    budget_nano   INTEGER CHECK (budget_nano IS NULL OR budget_nano >= 0),
    spent_nano    INTEGER NOT NULL DEFAULT 0,
    models        TEXT    NOT NULL DEFAULT '[]',  -- JSON array; empty = all
    allow_ips     TEXT    NOT NULL DEFAULT '[]',  -- JSON array of CIDRs; empty = any
    rpm           INTEGER,
    tpm           INTEGER,
    concurrency   INTEGER,
    created_at    INTEGER NOT NULL
);
CREATE INDEX api_keys_account ON api_keys(account_id);

-- One row per request, keyed on tollgate's request id (writes are idempotent).
CREATE TABLE usage_ledger (
    request_id        TEXT    PRIMARY KEY,
    ts                INTEGER NOT NULL,            -- unix ms
    key_id            INTEGER,
    account_id        INTEGER,
    model             TEXT    NOT NULL,
    upstream_model    TEXT,
    channel           TEXT,
    status            INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens     INTEGER NOT NULL DEFAULT 0,
    cost_nano         INTEGER NOT NULL DEFAULT 0,
    latency_ms        INTEGER NOT NULL DEFAULT 0,
    ttft_ms           INTEGER,
    stream            INTEGER NOT NULL DEFAULT 0,
    estimated         INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX usage_ledger_ts ON usage_ledger(ts);
CREATE INDEX usage_ledger_account_ts ON usage_ledger(account_id, ts);

-- Bumped on every key change, so running gateways notice revokes made by other processes.
CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO meta(name, value) VALUES ('key_epoch', 0);
CREATE TRIGGER api_keys_epoch_ins AFTER INSERT ON api_keys
    BEGIN UPDATE meta SET value = value + 1 WHERE name = 'key_epoch'; END;
CREATE TRIGGER api_keys_epoch_upd AFTER UPDATE OF revoked_at, expires_at, models, allow_ips, rpm, tpm, concurrency, budget_nano ON api_keys
    BEGIN UPDATE meta SET value = value + 1 WHERE name = 'key_epoch'; END;
CREATE TRIGGER api_keys_epoch_del AFTER DELETE ON api_keys
    BEGIN UPDATE meta SET value = value + 1 WHERE name = 'key_epoch'; END;
