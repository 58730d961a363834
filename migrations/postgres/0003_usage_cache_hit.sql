-- PostgreSQL's dialect of ../0003_usage_cache_hit.sql.
-- Response cache: a ledger row answered from the cache instead of a provider.
ALTER TABLE usage_ledger ADD COLUMN cache_hit BIGINT NOT NULL DEFAULT 0;
