//! The command line: `serve`, `check-config`, `migrate`, `accounts …`, `keys …`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;

use crate::config::{Config, LimitSet};
use crate::store::{self, accounts, keys, money, usage, Pool};

#[derive(Parser, Debug)]
#[command(
    name = "tollgate",
    version,
    about = "An AI gateway: keys, limits, exact billing, streaming relay"
)]
pub struct Cli {
    /// The YAML config file.
    #[arg(long, global = true, default_value = "conf/tollgate.yaml")]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gateway.
    Serve,
    /// Validate the config and print every error.
    CheckConfig,
    /// Apply pending database migrations.
    Migrate,
    /// Manage accounts.
    #[command(subcommand)]
    Accounts(AccountsCmd),
    /// Manage API keys.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Usage and cost from the ledger.
    Usage {
        #[arg(long)]
        account: Option<String>,
        /// From this time: RFC 3339, YYYY-MM-DD or unix ms.
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
        #[arg(long)]
        model: Option<String>,
        /// Break the totals down by model, day or key.
        #[arg(long)]
        by: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// The ledger writer's throughput: rows/s through group commits into a scratch SQLite
    /// file with the configured PRAGMAs and `accounting` settings.
    Ledger {
        #[arg(long, default_value_t = 200_000)]
        rows: usize,
        /// Accounts the rows are spread over (one key each).
        #[arg(long, default_value_t = 100)]
        accounts: usize,
    },
}

#[derive(Subcommand, Debug)]
pub enum AccountsCmd {
    /// Create an account.
    Create {
        name: String,
        #[arg(long, default_value = "default")]
        group: String,
        /// Opening balance in USD (exact decimal, up to 9 places).
        #[arg(long, default_value = "0")]
        balance_usd: String,
    },
    /// Add funds to an account.
    Topup {
        name: String,
        #[arg(long)]
        usd: String,
    },
    /// List accounts.
    List,
}

#[derive(Subcommand, Debug)]
pub enum KeysCmd {
    /// Create a key; prints the secret once, alone on the last line.
    Create(CreateKey),
    /// List keys (never their secrets).
    List {
        #[arg(long)]
        account: Option<String>,
    },
    /// Revoke a key by id or display prefix.
    Revoke { key: String },
}

#[derive(Args, Debug)]
pub struct CreateKey {
    #[arg(long)]
    pub account: String,
    #[arg(long, default_value = "")]
    pub name: String,
    #[arg(long)]
    pub budget_usd: Option<String>,
    /// Allowed models, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    pub models: Vec<String>,
    #[arg(long)]
    pub rpm: Option<u32>,
    #[arg(long)]
    pub tpm: Option<u32>,
    #[arg(long)]
    pub concurrency: Option<u32>,
    /// Queue priority, 0 (lowest) to 9 (default: the group's, else queue.default_priority).
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=9))]
    pub priority: Option<u8>,
    /// Highest priority a client may ask for with `x-tollgate-priority`.
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=9))]
    pub max_priority: Option<u8>,
    /// Limits on one model, e.g. `gpt-4o=rpm:60,tpm:100000` (repeat the flag per model).
    #[arg(long)]
    pub model_limits: Vec<String>,
    /// Expiry time, RFC 3339 (e.g. 2027-01-01T00:00:00Z).
    #[arg(long)]
    pub expires: Option<String>,
    /// Allowed client networks, comma-separated CIDRs (default: any).
    #[arg(long, value_delimiter = ',')]
    pub allow_ips: Vec<String>,
}

type CliResult = Result<(), Box<dyn std::error::Error>>;

fn load(path: &std::path::Path) -> Result<Config, Box<dyn std::error::Error>> {
    Ok(Config::load(path)?)
}

fn open(cfg: &Config) -> Result<Pool, Box<dyn std::error::Error>> {
    Ok(store::open_and_migrate(&cfg.database)?)
}

/// Runs one command. `serve` does not return until shutdown.
pub fn run(cli: Cli) -> CliResult {
    match cli.command {
        Command::CheckConfig => {
            let cfg = load(&cli.config)?;
            println!(
                "{}: ok ({} channel(s), {} priced model(s))",
                cli.config.display(),
                cfg.channels.len(),
                cfg.pricing.models.len()
            );
            Ok(())
        }
        Command::Migrate => {
            let cfg = load(&cli.config)?;
            let pool = store::open(&cfg.database)?;
            let applied = store::migrate(&mut *pool.get()?)?;
            println!("applied {} migration(s): {:?}", applied.len(), applied);
            Ok(())
        }
        Command::Serve => {
            let cfg = load(&cli.config)?;
            init_tracing(&cfg.server.log_level);
            crate::server::run(cfg)
        }
        Command::Accounts(cmd) => {
            let cfg = load(&cli.config)?;
            let pool = open(&cfg)?;
            accounts_cmd(&pool, cmd)
        }
        Command::Keys(cmd) => {
            let cfg = load(&cli.config)?;
            let pool = open(&cfg)?;
            keys_cmd(&cfg, &pool, cmd)
        }
        Command::Bench(BenchCmd::Ledger { rows, accounts }) => {
            let cfg = load(&cli.config)?;
            bench_ledger(&cfg, rows, accounts.max(1))
        }
        Command::Usage {
            account,
            since,
            until,
            model,
            by,
        } => {
            let cfg = load(&cli.config)?;
            let pool = open(&cfg)?;
            let filter = usage::UsageFilter {
                account,
                key_id: None,
                model,
                since: since.as_deref().map(usage::parse_time).transpose()?,
                until: until.as_deref().map(usage::parse_time).transpose()?,
            };
            let by = by
                .as_deref()
                .map(str::parse::<usage::GroupBy>)
                .transpose()?;
            let (total, groups) = usage::summary(&pool, &filter, by)?;
            let line = |name: &str, t: &usage::UsageTotals| {
                println!(
                    "{:<28} {:>10} {:>14} {:>14} {:>12} {:>18}",
                    name,
                    t.requests,
                    t.prompt_tokens,
                    t.completion_tokens,
                    t.cached_tokens,
                    t.cost_usd
                )
            };
            println!(
                "{:<28} {:>10} {:>14} {:>14} {:>12} {:>18}",
                "GROUP", "REQUESTS", "PROMPT", "COMPLETION", "CACHED", "COST_USD"
            );
            for g in &groups {
                line(&g.group, &g.totals);
            }
            line("TOTAL", &total);
            Ok(())
        }
    }
}

fn accounts_cmd(pool: &Pool, cmd: AccountsCmd) -> CliResult {
    match cmd {
        AccountsCmd::Create {
            name,
            group,
            balance_usd,
        } => {
            let a = accounts::create(pool, &name, &group, money::parse_usd(&balance_usd)?)?;
            println!(
                "created account {} (group {}, balance {} USD)",
                a.name,
                a.group,
                a.balance_usd()
            );
        }
        AccountsCmd::Topup { name, usd } => {
            let a = accounts::topup(pool, &name, money::parse_usd(&usd)?)?;
            println!("{}: balance {} USD", a.name, a.balance_usd());
        }
        AccountsCmd::List => {
            println!("{:<24} {:<12} {:>20}", "NAME", "GROUP", "BALANCE_USD");
            for a in accounts::list(pool)? {
                println!("{:<24} {:<12} {:>20}", a.name, a.group, a.balance_usd());
            }
        }
    }
    Ok(())
}

fn parse_expiry(s: &str) -> Result<i64, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .map_err(|e| format!("--expires `{s}`: {e} (expected RFC 3339, e.g. 2027-01-01T00:00:00Z)"))
}

fn keys_cmd(cfg: &Config, pool: &Pool, cmd: KeysCmd) -> CliResult {
    match cmd {
        KeysCmd::Create(k) => {
            let allow_ips = k
                .allow_ips
                .iter()
                .filter(|s| !s.is_empty())
                .map(|s| parse_net(s))
                .collect::<Result<Vec<_>, _>>()?;
            let new = keys::NewKey {
                account: k.account,
                name: k.name,
                budget_nano: k.budget_usd.as_deref().map(money::parse_usd).transpose()?,
                models: k.models.into_iter().filter(|m| !m.is_empty()).collect(),
                rpm: k.rpm,
                tpm: k.tpm,
                concurrency: k.concurrency,
                expires_at: k.expires.as_deref().map(parse_expiry).transpose()?,
                allow_ips,
                priority: k.priority,
                max_priority: k.max_priority,
                model_limits: k
                    .model_limits
                    .iter()
                    .map(|s| LimitSet::parse_model_limits(s))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("--model-limits {e}"))?
                    .into_iter()
                    .flatten()
                    .collect(),
            };
            let (info, secret) = keys::create(pool, &new)?;
            println!(
                "created key {} ({}) for account {}",
                info.id, info.prefix, info.account
            );
            println!("store it now; it is not shown again:");
            println!("{secret}");
        }
        KeysCmd::List { account } => {
            println!(
                "{:<6} {:<14} {:<16} {:<16} {:<8} MODELS",
                "ID", "PREFIX", "ACCOUNT", "NAME", "STATUS"
            );
            for k in keys::list(pool, account.as_deref())? {
                let status = if k.revoked { "revoked" } else { "active" };
                let models = if k.models.is_empty() {
                    "*".to_string()
                } else {
                    k.models.join(",")
                };
                println!(
                    "{:<6} {:<14} {:<16} {:<16} {:<8} {}",
                    k.id, k.prefix, k.account, k.name, status, models
                );
            }
        }
        KeysCmd::Revoke { key } => {
            let info = keys::revoke(pool, &key)?;
            println!("revoked key {} ({})", info.id, info.prefix);
            if let Err(e) = notify_gateway(cfg) {
                eprintln!("note: no running gateway answered ({e}); running gateways notice within a second");
            }
        }
    }
    Ok(())
}

fn bench_ledger(cfg: &Config, rows: usize, n_accounts: usize) -> CliResult {
    use std::sync::Arc;
    use tollgate_filters::billing::{LedgerRow, LedgerSink, Usage, Wallets};

    let path =
        std::env::temp_dir().join(format!("tollgate-bench-ledger-{}.db", std::process::id()));
    let db = crate::config::DatabaseConfig {
        path: path.clone(),
        ..cfg.database.clone()
    };
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
    let wallets = Arc::new(Wallets::new(Arc::new(accounts::SqliteBalances(
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
                estimated: false,
            },
            cost_nano: 147_000,
            budget_key: None,
            latency_ms: 800,
            ttft_ms: Some(200),
            stream: true,
        });
    }
    let queued = started.elapsed();
    ledger.shutdown();
    let took = started.elapsed();
    let c = pool.get()?;
    let n: i64 = c.query_row("SELECT COUNT(*) FROM usage_ledger", [], |r| r.get(0))?;
    drop(c);
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

/// A bare address counts as a single host (`/32` or `/128`).
fn parse_net(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("`{s}` is not a CIDR like 10.0.0.0/8"))
}

/// Tells the local gateway's admin listener to drop its key cache, so a revoke is in force
/// from the very next request.
fn notify_gateway(cfg: &Config) -> Result<(), String> {
    let addr: SocketAddr = cfg
        .server
        .admin_listen
        .parse()
        .map_err(|e| format!("{e}"))?;
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_millis(500)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let auth = if cfg.server.admin_token.is_empty() {
        String::new()
    } else {
        format!("Authorization: Bearer {}\r\n", cfg.server.admin_token)
    };
    let req = format!(
        "POST /admin/cache/keys/invalidate HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut status = [0u8; 12];
    s.read_exact(&mut status).map_err(|e| e.to_string())?;
    if status.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        Err(format!(
            "admin listener answered {}",
            String::from_utf8_lossy(&status[9..])
        ))
    }
}

pub fn init_tracing(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .try_init();
}
