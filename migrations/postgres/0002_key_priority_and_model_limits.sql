-- PostgreSQL's dialect of ../0002_key_priority_and_model_limits.sql.
-- Admission: a key's queue priority, the highest a client may ask for, and its limits per
-- model (JSON object: model → {rpm, tpm, concurrency, images_per_min, audio_seconds_per_min}).
ALTER TABLE api_keys ADD COLUMN priority BIGINT CHECK (priority IS NULL OR priority BETWEEN 0 AND 9);
ALTER TABLE api_keys ADD COLUMN max_priority BIGINT CHECK (max_priority IS NULL OR max_priority BETWEEN 0 AND 9);
ALTER TABLE api_keys ADD COLUMN model_limits TEXT NOT NULL DEFAULT '{}';

-- Running gateways notice changes to the new columns too.
DROP TRIGGER api_keys_epoch_upd ON api_keys;
CREATE TRIGGER api_keys_epoch_upd AFTER UPDATE OF revoked_at, expires_at, models, allow_ips, rpm, tpm, concurrency, budget_nano, priority, max_priority, model_limits ON api_keys
    FOR EACH ROW EXECUTE FUNCTION tollgate_bump_key_epoch();
