//! Accounts: a name, a group (for pricing and limits) and a prepaid balance in nano-USD.

use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use super::{money, now_ms, pg, Pool, Store, StoreError};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Account {
    pub id: i64,
    pub name: String,
    pub group: String,
    pub balance_nano: i64,
    pub created_at: i64,
}

impl Account {
    pub fn balance_usd(&self) -> String {
        money::format_usd(self.balance_nano)
    }
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Account> {
    Ok(Account {
        id: r.get(0)?,
        name: r.get(1)?,
        group: r.get(2)?,
        balance_nano: r.get(3)?,
        created_at: r.get(4)?,
    })
}

pub(super) const COLS: &str = "id, name, grp, balance_nano, created_at";

pub fn create(
    store: &Store,
    name: &str,
    group: &str,
    balance_nano: i64,
) -> Result<Account, StoreError> {
    if name.trim().is_empty() {
        return Err(StoreError::Invalid("account name must not be empty".into()));
    }
    if balance_nano < 0 {
        return Err(StoreError::Invalid("balance must not be negative".into()));
    }
    match store {
        Store::Sqlite(pool) => create_sqlite(pool, name, group, balance_nano),
        Store::Postgres(pool) => pg::accounts::create(pool, name, group, balance_nano),
    }
}

fn create_sqlite(
    pool: &Pool,
    name: &str,
    group: &str,
    balance_nano: i64,
) -> Result<Account, StoreError> {
    let c = pool.get()?;
    let now = now_ms();
    let res = c.execute(
        "INSERT INTO accounts(name, grp, balance_nano, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?4)",
        params![name, group, balance_nano, now],
    );
    match res {
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            return Err(StoreError::Conflict(format!(
                "account `{name}` already exists"
            )))
        }
        r => r?,
    };
    Ok(Account {
        id: c.last_insert_rowid(),
        name: name.to_string(),
        group: group.to_string(),
        balance_nano,
        created_at: now,
    })
}

pub fn get(store: &Store, name: &str) -> Result<Account, StoreError> {
    let pool = match store {
        Store::Sqlite(pool) => pool,
        Store::Postgres(pool) => return pg::accounts::get(pool, name),
    };
    pool.get()?
        .query_row(
            &format!("SELECT {COLS} FROM accounts WHERE name = ?1"),
            [name],
            row,
        )
        .optional()?
        .ok_or_else(|| StoreError::NotFound(format!("no account named `{name}`")))
}

pub fn list(store: &Store) -> Result<Vec<Account>, StoreError> {
    let pool = match store {
        Store::Sqlite(pool) => pool,
        Store::Postgres(pool) => return pg::accounts::list(pool),
    };
    let c = pool.get()?;
    let mut st = c.prepare(&format!("SELECT {COLS} FROM accounts ORDER BY name"))?;
    let rows = st.query_map([], row)?.collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Adds `delta_nano` (positive) to the balance; returns the account as the update left it.
pub fn topup(store: &Store, name: &str, delta_nano: i64) -> Result<Account, StoreError> {
    match store {
        Store::Sqlite(pool) => topup_on(&*pool.get()?, name, delta_nano),
        Store::Postgres(pool) => pg::accounts::topup_on(&mut *pool.get()?, name, delta_nano),
    }
}

/// [`topup`] on a given connection (the ledger writer's, inside a running gateway).
pub fn topup_on(
    c: &rusqlite::Connection,
    name: &str,
    delta_nano: i64,
) -> Result<Account, StoreError> {
    if delta_nano <= 0 {
        return Err(StoreError::Invalid("top-up must be positive".into()));
    }
    c.query_row(
        &format!("UPDATE accounts SET balance_nano = balance_nano + ?1, updated_at = ?2 WHERE name = ?3 RETURNING {COLS}"),
        params![delta_nano, now_ms(), name],
        row,
    )
    .optional()?
    .ok_or_else(|| StoreError::NotFound(format!("no account named `{name}`")))
}

/// An account's stored balance by id.
pub fn balance_by_id(store: &Store, id: i64) -> Result<i64, StoreError> {
    match store {
        Store::Sqlite(pool) => Ok(pool.get()?.query_row(
            "SELECT balance_nano FROM accounts WHERE id = ?1",
            [id],
            |r| r.get(0),
        )?),
        Store::Postgres(pool) => {
            pg::accounts::scalar_by_id(pool, "SELECT balance_nano FROM accounts WHERE id = $1", id)
        }
    }
}

/// A key's stored spend by id.
pub fn key_spent_by_id(store: &Store, id: i64) -> Result<i64, StoreError> {
    match store {
        Store::Sqlite(pool) => Ok(pool.get()?.query_row(
            "SELECT spent_nano FROM api_keys WHERE id = ?1",
            [id],
            |r| r.get(0),
        )?),
        Store::Postgres(pool) => {
            pg::accounts::scalar_by_id(pool, "SELECT spent_nano FROM api_keys WHERE id = $1", id)
        }
    }
}

/// The [`tollgate_filters::billing::BalanceSource`] port over the store.
pub struct StoreBalances(pub Store);

impl StoreBalances {
    /// One integer by id, on the blocking pool.
    async fn read(
        &self,
        f: fn(&Store, i64) -> Result<i64, StoreError>,
        id: i64,
    ) -> Result<i64, String> {
        let store = self.0.clone();
        tokio::task::spawn_blocking(move || f(&store, id).map_err(|e| e.to_string()))
            .await
            .map_err(|e| e.to_string())?
    }
}

#[async_trait::async_trait]
impl tollgate_filters::billing::BalanceSource for StoreBalances {
    async fn account_balance(&self, account_id: i64) -> Result<i64, String> {
        self.read(balance_by_id, account_id).await
    }

    async fn key_spent(&self, key_id: i64) -> Result<i64, String> {
        self.read(key_spent_by_id, key_id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_get_list_and_topup() {
        crate::store::testing::each_store(|store| {
            let a = create(store, "acme", "default", 5).unwrap();
            assert!(matches!(
                create(store, "acme", "default", 0),
                Err(StoreError::Conflict(_))
            ));
            let t = topup(store, "acme", 10).unwrap();
            assert_eq!((t.id, t.balance_nano), (a.id, 15));
            assert_eq!(get(store, "acme").unwrap(), t);
            assert_eq!(list(store).unwrap(), [t]);
            assert_eq!(balance_by_id(store, a.id).unwrap(), 15);
            assert!(matches!(get(store, "nope"), Err(StoreError::NotFound(_))));
            assert!(matches!(
                topup(store, "nope", 1),
                Err(StoreError::NotFound(_))
            ));
            assert!(topup(store, "acme", -1).is_err());
            assert!(create(store, "neg", "default", -1).is_err());
        });
    }
}
