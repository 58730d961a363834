//! The command line: `serve`, `check-config`, `migrate`, `accounts …`, `keys …`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;

mod bench;
mod status;

use bench::bench_ledger;
use status::{admin_request, render_status};

use crate::config::{Config, LimitSet};
use crate::store::{self, accounts, keys, money, usage, Store};

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
    Serve {
        /// Take the listening sockets of a running tollgate over `server.upgrade_sock`
        /// (start this, then send SIGQUIT to the old process): a zero-downtime upgrade.
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate the config and print every error.
    CheckConfig,
    /// Apply pending database migrations to the configured store; or, with `--from` and
    /// `--to`, copy an SQLite store into an empty PostgreSQL database.
    Migrate {
        /// The store to copy from: `sqlite:PATH`.
        #[arg(long, requires = "to", value_name = "sqlite:PATH")]
        from: Option<String>,
        /// The PostgreSQL database to copy into (`postgres://…`), migrated and empty.
        #[arg(long, requires = "from", value_name = "postgres://…")]
        to: Option<String>,
    },
    /// Manage accounts.
    #[command(subcommand)]
    Accounts(AccountsCmd),
    /// Manage API keys.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Load-test an OpenAI-compatible endpoint (`--url`), or `bench ledger`.
    Bench(BenchArgs),
    /// A one-screen health view of a running gateway, from its admin API.
    Status {
        /// The admin listener to ask (default: `server.admin_listen` from the config).
        #[arg(long)]
        admin: Option<String>,
    },
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

/// `tollgate bench --url URL …` load-tests an endpoint; `tollgate bench ledger` measures
/// the ledger writer.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub cmd: Option<BenchCmd>,
    #[command(flatten)]
    pub load: crate::loadtest::LoadArgs,
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

fn open(cfg: &Config) -> Result<Store, Box<dyn std::error::Error>> {
    Ok(store::open_and_migrate(&cfg.database)?)
}

/// Runs one command. `serve` does not return until shutdown.
pub fn run(cli: Cli) -> CliResult {
    match cli.command {
        Command::CheckConfig => {
            let cfg = load(&cli.config)?;
            // Where each channel really goes, resolved as the gateway will resolve it.
            let (mut errors, warnings) = cfg.check_upstreams();
            // The listeners' certificates: readable, key matching, valid now.
            errors.extend(crate::tls::check_files(
                cfg.server.tls.as_ref(),
                cfg.server.admin_tls.as_ref(),
            ));
            let text = std::fs::read_to_string(&cli.config).unwrap_or_default();
            let located = |mut e: crate::config::ConfigError| {
                e.line = crate::config::line_of(&text, &e.path);
                e
            };
            for w in warnings {
                eprintln!("warning: {}", located(w));
            }
            if !errors.is_empty() {
                return Err(Box::new(crate::config::ConfigErrors {
                    file: cli.config.clone(),
                    errors: errors.into_iter().map(located).collect(),
                }));
            }
            println!(
                "{}: ok ({} channel(s), {} priced model(s))",
                cli.config.display(),
                cfg.channels.len(),
                cfg.pricing.models.len()
            );
            Ok(())
        }
        Command::Migrate {
            from: Some(from),
            to: Some(to),
        } => copy_store(&cli.config, &from, &to),
        Command::Migrate { .. } => {
            let cfg = load(&cli.config)?;
            let applied = store::open(&cfg.database)?.migrate()?;
            println!("applied {} migration(s): {:?}", applied.len(), applied);
            Ok(())
        }
        Command::Serve { upgrade } => {
            let cfg = load(&cli.config)?;
            let log = crate::observe::access_log::init(&cfg.server.log_level, &cfg.log);
            crate::server::run(cfg, &cli.config, log, upgrade)
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
        Command::Status { admin } => {
            let cfg = load(&cli.config)?;
            let addr = admin.unwrap_or_else(|| cfg.server.admin_listen.clone());
            let (code, body) =
                admin_request(&addr, &cfg.server.admin_token, "GET", "/admin/status")?;
            if code != 200 {
                return Err(format!(
                    "admin listener {addr} answered {code}: {}",
                    String::from_utf8_lossy(&body)
                )
                .into());
            }
            let v: serde_json::Value = serde_json::from_slice(&body)?;
            print!("{}", render_status(&addr, &v));
            Ok(())
        }
        Command::Bench(BenchArgs {
            cmd: Some(BenchCmd::Ledger { rows, accounts }),
            ..
        }) => {
            let cfg = load(&cli.config)?;
            bench_ledger(&cfg, rows, accounts.max(1))
        }
        Command::Bench(BenchArgs { cmd: None, load }) => {
            if load.url.is_none() {
                return Err("`tollgate bench` needs `--url` (or the `ledger` subcommand)".into());
            }
            if crate::loadtest::main(load)? {
                Ok(())
            } else {
                Err("no request succeeded".into())
            }
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
                    "{:<28} {:>10} {:>14} {:>14} {:>12} {:>10} {:>18}",
                    name,
                    t.requests,
                    t.prompt_tokens,
                    t.completion_tokens,
                    t.cached_tokens,
                    t.cache_hits,
                    t.cost_usd
                )
            };
            println!(
                "{:<28} {:>10} {:>14} {:>14} {:>12} {:>10} {:>18}",
                "GROUP", "REQUESTS", "PROMPT", "COMPLETION", "CACHED", "CACHE_HITS", "COST_USD"
            );
            for g in &groups {
                line(&g.group, &g.totals);
            }
            line("TOTAL", &total);
            Ok(())
        }
    }
}

/// `migrate --from sqlite:PATH --to postgres://…`. The config is optional here (its
/// `database` timeouts are used when it loads); the URL is never printed with its password.
fn copy_store(config: &std::path::Path, from: &str, to: &str) -> CliResult {
    let Some(path) = from.strip_prefix("sqlite:") else {
        return Err("--from must be sqlite:PATH".into());
    };
    if !(to.starts_with("postgres://") || to.starts_with("postgresql://")) {
        return Err("--to must be a postgres:// or postgresql:// URL".into());
    }
    let db = if config.exists() {
        load(config)?.database
    } else {
        crate::config::DatabaseConfig::default()
    };
    let c = store::pg::copy::sqlite_to_postgres(&db, std::path::Path::new(path), to)?;
    println!(
        "copied {} account(s), {} key(s), {} ledger row(s) ({} USD in balances) from {path} to {}",
        c.accounts,
        c.keys,
        c.ledger_rows,
        money::format_usd(c.balance_nano),
        store::pg::redact(to)
    );
    Ok(())
}

fn accounts_cmd(pool: &Store, cmd: AccountsCmd) -> CliResult {
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

fn keys_cmd(cfg: &Config, pool: &Store, cmd: KeysCmd) -> CliResult {
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

/// A bare address counts as a single host (`/32` or `/128`).
fn parse_net(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("`{s}` is not a CIDR like 10.0.0.0/8"))
}

/// Tells the local gateway's admin listener to drop its key cache, so a revoke is in force
/// from the very next request.
fn notify_gateway(cfg: &Config) -> Result<(), String> {
    let (code, _) = admin_request(
        &cfg.server.admin_listen,
        &cfg.server.admin_token,
        "POST",
        "/admin/cache/keys/invalidate",
    )?;
    if code == 200 {
        Ok(())
    } else {
        Err(format!("admin listener answered {code}"))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn status_fits_one_screen_and_names_what_is_down() {
        let v = serde_json::json!({
            "version": "0.1.0", "commit": "abc", "ready": "ready", "uptime_s": 90061,
            "window_s": 60, "requests_in_window": 600, "requests_per_s": 10.0,
            "p99_ms": 12.5, "overhead_p99_ms": 0.2, "in_flight": 3, "ledger_lag_rows": 7,
            "channels": [
                {"name": "a", "up": true, "in_use": 1, "max_concurrency": 8},
                {"name": "b", "up": false, "in_use": 0, "max_concurrency": 8}
            ]
        });
        let s = super::status::render_status("127.0.0.1:8081", &v);
        assert!(s.contains("uptime      1d 01h 01m 01s"), "{s}");
        assert!(s.contains("10.0 req/s"), "{s}");
        assert!(s.contains("p99 12.5 ms"), "{s}");
        assert!(s.contains("channels    1/2 up"), "{s}");
        assert!(s.contains("b                        DOWN"), "{s}");
        assert!(s.contains("ledger lag  7 rows"), "{s}");
        assert!(s.lines().count() < 24);
    }
}
