-- Response cache: a ledger row answered from the cache instead of a provider.
ALTER TABLE usage_ledger ADD COLUMN cache_hit INTEGER NOT NULL DEFAULT 0;
