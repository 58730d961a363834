//! The ledger writer: one thread, one connection (SQLite, or PostgreSQL with
//! `database.url`: see `store::pg::ledger`), group commits.
//!
//! Rows arrive over a channel from the request path (never blocking it, and never waking
//! the writer: it sleeps through each window instead of waiting on the channel). The
//! writer takes the first row, lets `accounting.flush_interval_ms` pass, then commits
//! everything queued, in transactions of at most `accounting.max_batch` rows, together with
//! the balance and budget changes, each in one `BEGIN IMMEDIATE` transaction. Inserts are `INSERT OR IGNORE` on the
//! request id, and a row's money moves only when its insert took effect, so writing the
//! same request twice changes nothing. A failed commit keeps the batch and retries: rows
//! are never dropped. On SIGTERM the channel is closed and the writer drains it before the
//! process exits; on SIGKILL, at most the rows of the open flush window are lost.
//!
//! The queue is bounded by `accounting.max_queue_rows` (uncommitted rows): past it,
//! [`LedgerSink::has_room`] says no, so new requests are refused (503 `ledger_backlogged`)
//! and /readyz fails, while rows of requests already admitted are still queued. A stuck
//! writer (a full disk, a locked database) so costs bounded memory, not an unbounded queue.
//! Top-ups wait for the writer at most [`JOB_TIMEOUT`], and one that timed out never lands.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use tollgate_filters::billing::{Committed, LedgerRow, LedgerSink, Wallets};

use crate::config::{AccountingConfig, DatabaseConfig};
use crate::metrics::Metrics;
use crate::store::{accounts, StoreError};

mod conn;
pub use conn::WriterConn;

/// Work run on the writer thread right after the rows queued before it are committed, so
/// every change to stored balances happens in one order.
type Job = Box<dyn FnOnce(&mut WriterConn, &OnCommit) + Send>;

enum Msg {
    Row(Box<LedgerRow>),
    Job(Job),
}

/// Called after each commit with what moved and the stored amounts read back.
type OnCommit = Arc<dyn Fn(&Committed) + Send + Sync>;

/// How long a top-up waits for the writer before answering with an error.
pub const JOB_TIMEOUT: Duration = Duration::from_secs(5);

/// A job's state, so that one whose caller stopped waiting never runs.
const PENDING: u8 = 0;
const RUNNING: u8 = 1;
const CANCELLED: u8 = 2;

pub struct Ledger {
    /// The queue's sending side; loaded without a lock on the request path, emptied at
    /// shutdown.
    tx: ArcSwapOption<Sender<Msg>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// The writer, to wake it early for a job or the shutdown (rows never wake it).
    writer: std::thread::Thread,
    nudge: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    /// Rows recorded and not yet committed.
    queued: Arc<AtomicUsize>,
    max_queue_rows: usize,
    job_timeout: Duration,
}

impl Ledger {
    /// Starts the writer on its own connection. `wallets` learns of every commit.
    pub fn start(
        db: &DatabaseConfig,
        cfg: &AccountingConfig,
        wallets: Arc<Wallets>,
        metrics: Arc<Metrics>,
    ) -> Result<Ledger, StoreError> {
        Ledger::start_leased(db, cfg, wallets, metrics, None)
    }

    /// [`Self::start`]; with `lease_node` (lease mode), commits also move that node's slices.
    pub fn start_leased(
        db: &DatabaseConfig,
        cfg: &AccountingConfig,
        wallets: Arc<Wallets>,
        metrics: Arc<Metrics>,
        lease_node: Option<String>,
    ) -> Result<Ledger, StoreError> {
        let on_commit: OnCommit = Arc::new(move |c| wallets.committed(c));
        Ledger::start_with_lease(db, cfg, on_commit, metrics, lease_node)
    }

    #[cfg(test)]
    fn start_with(
        db: &DatabaseConfig,
        cfg: &AccountingConfig,
        on_commit: OnCommit,
        metrics: Arc<Metrics>,
    ) -> Result<Ledger, StoreError> {
        Ledger::start_with_lease(db, cfg, on_commit, metrics, None)
    }

    fn start_with_lease(
        db: &DatabaseConfig,
        cfg: &AccountingConfig,
        on_commit: OnCommit,
        metrics: Arc<Metrics>,
        lease_node: Option<String>,
    ) -> Result<Ledger, StoreError> {
        let conn = WriterConn::open(db)?;
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let nudge = Arc::new(AtomicBool::new(false));
        let writer_cfg = WriterConfig {
            lease_node,
            window: Duration::from_millis(cfg.flush_interval_ms),
            max_batch: cfg.max_batch,
            metrics: metrics.clone(),
            queued: queued.clone(),
            nudge: nudge.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("tollgate-ledger".into())
            .spawn(move || writer(conn, rx, writer_cfg, on_commit))?;
        Ok(Ledger {
            tx: ArcSwapOption::from_pointee(tx),
            writer: thread.thread().clone(),
            nudge,
            thread: Mutex::new(Some(thread)),
            metrics,
            queued,
            max_queue_rows: cfg.max_queue_rows.max(1),
            job_timeout: JOB_TIMEOUT,
        })
    }

    fn send(&self, m: Msg) -> bool {
        let wake = matches!(m, Msg::Job(_));
        let sent = self.tx.load().as_ref().is_some_and(|tx| tx.send(m).is_ok());
        if wake {
            self.wake();
        }
        sent
    }

    /// Ends the writer's wait for its window now.
    fn wake(&self) {
        self.nudge.store(true, Ordering::SeqCst);
        self.writer.unpark();
    }

    /// Runs `job` on the writer thread after the rows queued before it; waits for its answer.
    fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut WriterConn, &OnCommit) -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |conn, on_commit| {
            let _ = tx.send(job(conn, on_commit));
        });
        if self.send(Msg::Job(job)) {
            rx.recv().ok()
        } else {
            None
        }
    }

    /// Like [`Self::run`], but gives up after `job_timeout`; a job given up on never runs.
    /// `Err(true)` on time-out, `Err(false)` when the writer has stopped.
    fn run_within<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut WriterConn, &OnCommit) -> T + Send + 'static,
    ) -> Result<T, bool> {
        let (tx, rx) = mpsc::sync_channel(1);
        let state = Arc::new(AtomicU8::new(PENDING));
        let job_state = state.clone();
        let job: Job = Box::new(move |conn, on_commit| {
            if job_state
                .compare_exchange(PENDING, RUNNING, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                let _ = tx.send(job(conn, on_commit));
            }
        });
        if !self.send(Msg::Job(job)) {
            return Err(false);
        }
        match rx.recv_timeout(self.job_timeout) {
            Ok(v) => Ok(v),
            Err(RecvTimeoutError::Disconnected) => Err(false),
            Err(RecvTimeoutError::Timeout) => {
                if state
                    .compare_exchange(PENDING, CANCELLED, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    return Err(true);
                }
                // It started just now: its answer is on the way.
                rx.recv().map_err(|_| false)
            }
        }
    }

    /// Blocks until every row recorded before the call is committed.
    pub fn flush(&self) {
        let _ = self.run(|_, _| ());
    }

    /// Rows recorded and not yet committed.
    pub fn queued_rows(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// The queue is over `accounting.max_queue_rows` (for /readyz; counts nothing).
    pub fn backlogged(&self) -> bool {
        self.queued_rows() >= self.max_queue_rows
    }

    /// Adds to an account's balance on the writer thread, in order with the ledger's own
    /// commits, and tells the book the balance it read back. (A top-up written from another
    /// thread could land between a commit and the book hearing of it, and be undone.)
    pub fn topup(&self, account: &str, delta_nano: i64) -> Result<accounts::Account, StoreError> {
        let account = account.to_string();
        self.run_within(move |conn, on_commit| {
            let a = conn.topup(&account, delta_nano)?;
            on_commit(&Committed {
                balances: vec![(a.id, a.balance_nano)],
                ..Committed::default()
            });
            Ok(a)
        })
        .unwrap_or_else(|timed_out| {
            Err(StoreError::Unavailable(if timed_out {
                "the ledger writer is not committing (is the disk full?); the top-up was not applied, retry later".into()
            } else {
                "the ledger writer has stopped".into()
            }))
        })
    }

    /// Closes the channel and waits for the writer to commit everything queued.
    pub fn shutdown(&self) {
        self.tx.store(None);
        self.wake();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl LedgerSink for Ledger {
    fn record(&self, row: LedgerRow) {
        // Past the bound, a refused request's row (it reached no provider and moved no
        // money) is not queued: otherwise a flood of refusals would grow the queue anyway.
        if self.backlogged() && row.cost_nano == 0 && row.channel.is_none() {
            self.metrics.ledger_skipped.inc();
            return;
        }
        self.metrics.ledger_queue.inc();
        self.queued.fetch_add(1, Ordering::SeqCst);
        if !self.send(Msg::Row(Box::new(row))) {
            self.metrics.ledger_queue.dec();
            self.queued.fetch_sub(1, Ordering::SeqCst);
            tracing::error!("ledger writer is closed; a usage row was not recorded");
        }
    }

    fn has_room(&self) -> bool {
        if self.backlogged() {
            self.metrics.ledger_refused.inc();
            return false;
        }
        true
    }
}

struct WriterConfig {
    /// Lease mode: the node whose slices the charges come out of.
    lease_node: Option<String>,
    window: Duration,
    max_batch: usize,
    metrics: Arc<Metrics>,
    queued: Arc<AtomicUsize>,
    nudge: Arc<AtomicBool>,
}

fn writer(mut conn: WriterConn, rx: Receiver<Msg>, cfg: WriterConfig, on_commit: OnCommit) {
    let WriterConfig {
        lease_node,
        window,
        max_batch,
        metrics,
        queued,
        nudge,
    } = cfg;
    let mut batch: Vec<LedgerRow> = Vec::with_capacity(max_batch);
    let mut waiters: Vec<Job> = Vec::new();
    let mut open = true;
    while open {
        match rx.recv() {
            Ok(m) => take(m, &mut batch, &mut waiters),
            Err(_) => break,
        }
        // Sleep through the window rather than wait on the channel: a sender never wakes a
        // thread that is not parked on it, so under load the request path pays no wake-up
        // per row, and the writer wakes once per window. A job (a top-up) or the shutdown
        // ends the wait early.
        if waiters.is_empty() {
            let deadline = Instant::now() + window;
            while !nudge.swap(false, Ordering::SeqCst) {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                std::thread::park_timeout(left);
            }
        }
        // Everything queued by now, in transactions of at most `max_batch` rows; a job
        // commits what was queued before it, then runs.
        loop {
            while batch.len() < max_batch {
                match rx.try_recv() {
                    Ok(m) => take(m, &mut batch, &mut waiters),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            let full = batch.len() >= max_batch;
            commit_with_retry(
                &mut conn,
                lease_node.as_deref(),
                &mut batch,
                &on_commit,
                &metrics,
                &queued,
            );
            for job in waiters.drain(..) {
                job(&mut conn, &on_commit);
            }
            if !full || !open {
                break;
            }
        }
    }
    // Closed: commit whatever is left.
    while let Ok(m) = rx.try_recv() {
        take(m, &mut batch, &mut waiters);
    }
    commit_with_retry(
        &mut conn,
        lease_node.as_deref(),
        &mut batch,
        &on_commit,
        &metrics,
        &queued,
    );
    for job in waiters.drain(..) {
        job(&mut conn, &on_commit);
    }
    tracing::info!("ledger writer stopped");
}

fn take(m: Msg, batch: &mut Vec<LedgerRow>, jobs: &mut Vec<Job>) {
    match m {
        Msg::Row(r) => batch.push(*r),
        Msg::Job(j) => jobs.push(j),
    }
}

fn commit_with_retry(
    conn: &mut WriterConn,
    lease_node: Option<&str>,
    batch: &mut Vec<LedgerRow>,
    on_commit: &OnCommit,
    metrics: &Metrics,
    queued: &AtomicUsize,
) {
    if batch.is_empty() {
        return;
    }
    let mut delay = Duration::from_millis(10);
    loop {
        let started = Instant::now();
        match conn.commit(batch, lease_node) {
            Ok(committed) => {
                metrics
                    .ledger_commit
                    .observe(started.elapsed().as_secs_f64());
                metrics.ledger_rows.inc_by(batch.len() as u64);
                metrics.ledger_batch_rows.observe(batch.len() as f64);
                metrics.ledger_queue.sub(batch.len() as i64);
                queued.fetch_sub(batch.len(), Ordering::SeqCst);
                on_commit(&committed);
                batch.clear();
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, rows = batch.len(), "ledger commit failed; retrying");
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store;
    use rusqlite::Connection;
    use tollgate_filters::billing::Usage;

    fn row(id: &str, account: i64, key: i64, cost: i64) -> LedgerRow {
        LedgerRow {
            request_id: id.into(),
            ts_ms: 1,
            key_id: key,
            account_id: account,
            model: "m".into(),
            upstream_model: None,
            channel: Some("c".into()),
            status: 200,
            usage: Usage {
                prompt_tokens: 10,
                completion_tokens: 5,
                cached_tokens: 0,
                cache_write_tokens: 0,
                audio_prompt_tokens: 0,
                audio_completion_tokens: 0,
                estimated: false,
            },
            cost_nano: cost,
            budget_key: None,
            latency_ms: 3,
            ttft_ms: Some(1),
            stream: false,
            cache_hit: false,
        }
    }

    /// A migrated store on `db` with an account holding 1,000,000 nano-USD and a key.
    fn setup(db: &DatabaseConfig) -> (store::Store, i64, i64) {
        let store = store::open_and_migrate(db).unwrap();
        let a = store::accounts::create(&store, "acme", "default", 1_000_000).unwrap();
        let (k, _) = store::keys::create(
            &store,
            &store::keys::NewKey {
                account: "acme".into(),
                ..Default::default()
            },
        )
        .unwrap();
        (store, a.id, k.id)
    }

    /// Ledger rows, and the account's stored balance.
    fn rows_and_balance(store: &store::Store, account: i64) -> (i64, i64) {
        (
            store::testing::scalar(store, "SELECT COUNT(*) FROM usage_ledger"),
            store::accounts::balance_by_id(store, account).unwrap(),
        )
    }

    /// Holds the ledger's table locked from another connection until dropped: every commit
    /// fails (SQLite, as on a full disk) or waits (PostgreSQL, as on a stalled server).
    enum Blocker {
        Sqlite(Connection),
        Postgres(postgres::Client),
    }

    impl Blocker {
        fn lock(db: &DatabaseConfig) -> Blocker {
            match db.postgres_url() {
                None => {
                    let c = store::open_connection(db).unwrap();
                    c.execute_batch("BEGIN EXCLUSIVE").unwrap();
                    Blocker::Sqlite(c)
                }
                Some(url) => {
                    let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
                    c.batch_execute("BEGIN; LOCK TABLE usage_ledger IN EXCLUSIVE MODE")
                        .unwrap();
                    Blocker::Postgres(c)
                }
            }
        }

        fn release(self) {
            match self {
                Blocker::Sqlite(c) => c.execute_batch("ROLLBACK").unwrap(),
                Blocker::Postgres(mut c) => c.batch_execute("ROLLBACK").unwrap(),
            }
        }
    }

    #[test]
    fn rows_and_money_commit_together_and_duplicates_change_nothing() {
        store::testing::each_db(|db| {
            let (store, a, k) = setup(db);
            let seen = Arc::new(Mutex::new(Vec::new()));
            let s2 = seen.clone();
            let balances = Arc::new(Mutex::new(Vec::new()));
            let b2 = balances.clone();
            let ledger = Ledger::start_with(
                db,
                &AccountingConfig::default(),
                Arc::new(move |c: &Committed| {
                    s2.lock().unwrap().extend_from_slice(&c.charges);
                    b2.lock().unwrap().extend_from_slice(&c.balances);
                }),
                Arc::new(Metrics::new()),
            )
            .unwrap();
            ledger.record(row("r1", a, k, 100));
            ledger.record(row("r2", a, k, 50));
            ledger.record(row("r1", a, k, 100));
            ledger.flush();
            ledger.record(row("r2", a, k, 50));
            ledger.record(row("r3", a, k, 0));
            // A top-up runs in order with the commits, and the book hears the balance.
            assert_eq!(
                ledger.topup("acme", 7).unwrap().balance_nano,
                1_000_000 - 150 + 7
            );
            assert!(matches!(
                ledger.topup("nobody", 7),
                Err(StoreError::NotFound(_))
            ));
            ledger.shutdown();
            let (n, bal) = rows_and_balance(&store, a);
            let spent = store::accounts::key_spent_by_id(&store, k).unwrap();
            assert_eq!((n, bal, spent), (3, 1_000_000 - 150 + 7, 150));
            // The book hears of every charge, duplicates included, so its unflushed amounts
            // drain; only the two first writes moved money.
            assert_eq!(seen.lock().unwrap().iter().map(|x| x.2).sum::<i64>(), 300);
            assert_eq!(
                balances.lock().unwrap().last(),
                Some(&(a, 1_000_000 - 150 + 7))
            );
        });
    }

    /// Two gateways on one database (PostgreSQL's use; SQLite serialises them the same way)
    /// writing the same request ids: each row lands once and moves its money once.
    #[test]
    fn two_writers_on_one_database_move_money_once() {
        store::testing::each_db(|db| {
            let (store, a, k) = setup(db);
            let start = || {
                Ledger::start_with(
                    db,
                    &AccountingConfig::default(),
                    Arc::new(|_| {}),
                    Arc::new(Metrics::new()),
                )
                .unwrap()
            };
            let (one, two) = (start(), start());
            for i in 0..200 {
                one.record(row(&format!("r{i}"), a, k, 10));
                two.record(row(&format!("r{}", 199 - i), a, k, 10));
            }
            one.shutdown();
            two.shutdown();
            assert_eq!(rows_and_balance(&store, a), (200, 1_000_000 - 2000));
            assert_eq!(store::accounts::key_spent_by_id(&store, k).unwrap(), 2000);
        });
    }

    #[test]
    fn the_balance_stops_at_zero() {
        store::testing::each_db(|db| {
            let (store, a, k) = setup(db);
            let ledger = Ledger::start_with(
                db,
                &AccountingConfig::default(),
                Arc::new(|_| {}),
                Arc::new(Metrics::new()),
            )
            .unwrap();
            ledger.record(row("big", a, k, 3_000_000));
            ledger.shutdown();
            assert_eq!(rows_and_balance(&store, a), (1, 0));
            assert_eq!(
                store::accounts::key_spent_by_id(&store, k).unwrap(),
                3_000_000
            );
        });
    }

    #[test]
    fn a_stuck_writer_bounds_the_queue_refuses_new_work_and_loses_no_row() {
        store::testing::each_db(|db| {
            let (store, a, k) = setup(db);
            let mut db = db.clone();
            db.busy_timeout_ms = 10;
            let cfg = AccountingConfig {
                flush_interval_ms: 1,
                max_queue_rows: 10,
                ..Default::default()
            };
            let blocker = Blocker::lock(&db);
            let metrics = Arc::new(Metrics::new());
            let mut ledger =
                Ledger::start_with(&db, &cfg, Arc::new(|_| {}), metrics.clone()).unwrap();
            ledger.job_timeout = Duration::from_millis(300);
            assert!(ledger.has_room());
            // Admitted requests finish: their rows are queued even past the bound.
            for i in 0..15 {
                ledger.record(row(&format!("r{i}"), a, k, 1));
            }
            assert!(!ledger.has_room(), "new requests are refused");
            assert!(ledger.backlogged(), "/readyz fails");
            assert_eq!(metrics.ledger_refused.get(), 1);
            // A refused request's row (nothing served, no money) is not queued past the bound.
            ledger.record(LedgerRow {
                channel: None,
                ..row("refused", a, k, 0)
            });
            assert_eq!(
                (metrics.ledger_skipped.get(), ledger.queued_rows()),
                (1, 15)
            );
            // A top-up answers with an error instead of waiting forever, and never lands later.
            let asked = Instant::now();
            assert!(ledger.topup("acme", 5).is_err());
            assert!(asked.elapsed() < Duration::from_secs(3));
            // The database is writable again: everything queued commits.
            blocker.release();
            ledger.flush();
            assert!(ledger.has_room());
            ledger.shutdown();
            let (n, bal) = rows_and_balance(&store, a);
            assert_eq!((n, bal), (15, 1_000_000 - 15));
        });
    }

    #[test]
    fn shutdown_commits_everything_queued() {
        store::testing::each_db(|db| {
            let (store, a, k) = setup(db);
            let cfg = AccountingConfig {
                flush_interval_ms: 60_000,
                max_batch: 1_000_000,
                ..Default::default()
            };
            let metrics = Arc::new(Metrics::new());
            let ledger = Ledger::start_with(db, &cfg, Arc::new(|_| {}), metrics.clone()).unwrap();
            for i in 0..5000 {
                ledger.record(row(&format!("r{i}"), a, k, 1));
            }
            ledger.shutdown();
            assert_eq!(rows_and_balance(&store, a), (5000, 1_000_000 - 5000));
            assert_eq!(metrics.ledger_rows.get(), 5000);
            assert_eq!(metrics.ledger_queue.get(), 0);
        });
    }
}
