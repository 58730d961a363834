//! `tollgate bench ledger`: the ledger writer's throughput.

use super::CliResult;
use crate::config::Config;
use crate::store::{self, accounts, keys, money};

pub(super) fn bench_ledger(cfg: &Config, rows: usize, n_accounts: usize) -> CliResult {
    use std::sync::Arc;
    use tollgate_filters::billing::{LedgerRow, LedgerSink, Usage, Wallets};

    let path =
        std::env::temp_dir().join(format!("tollgate-bench-ledger-{}.db", std::process::id()));
    let db = cfg.database.with_sqlite_path(path.clone());
    let pool = store::open_and_migrate(&db)?;
    let mut ids = Vec::with_capacity(n_accounts);
    for i in 0..n_accounts {
        let name = format!("bench-{i}");
        let a = accounts::create(&pool, &name, "default", 1_000_000 * money::NANO_PER_USD)?;
        let (k, _) = keys::create(
            &pool,
            &keys::NewKey {
                account: name,
                ..Default::default()
            },
        )?;
        ids.push((a.id, k.id));
    }
    let wallets = Arc::new(Wallets::new(Arc::new(accounts::StoreBalances(
        pool.clone(),
    ))));
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let ledger = crate::ledger::Ledger::start(&db, &cfg.accounting, wallets, metrics)?;
    let started = std::time::Instant::now();
    for i in 0..rows {
        let (account_id, key_id) = ids[i % ids.len()];
        ledger.record(LedgerRow {
            request_id: format!("req_bench_{i:010}"),
            ts_ms: store::now_ms(),
            key_id,
            account_id,
            model: "gpt-4o-mini".into(),
            upstream_model: None,
            channel: Some("bench".into()),
            status: 200,
            usage: Usage {
                prompt_tokens: 500,
                completion_tokens: 120,
                cached_tokens: 0,
                cache_write_tokens: 0,
                audio_prompt_tokens: 0,
                audio_completion_tokens: 0,
                estimated: false,
            },
            cost_nano: 147_000,
            budget_key: None,
            latency_ms: 800,
            ttft_ms: Some(200),
            stream: true,
            cache_hit: false,
        });
    }
    let queued = started.elapsed();
    ledger.shutdown();
    let took = started.elapsed();
    let n = store::usage::summary(&pool, &Default::default(), None)?
        .0
        .requests;
    drop(pool);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    if n as usize != rows {
        return Err(format!("wrote {n} of {rows} rows").into());
    }
    println!(
        "ledger: {rows} rows over {n_accounts} accounts in {:.3}s (queued in {:.3}s): {:.0} rows/s; flush_interval_ms={} max_batch={} synchronous={:?}",
        took.as_secs_f64(),
        queued.as_secs_f64(),
        rows as f64 / took.as_secs_f64(),
        cfg.accounting.flush_interval_ms,
        cfg.accounting.max_batch,
        cfg.database.synchronous
    );
    Ok(())
}
