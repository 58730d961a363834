//! Accounts: a name, a group (for pricing and limits) and a prepaid balance in nano-USD.

use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use super::{money, now_ms, Pool, StoreError};

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

const COLS: &str = "id, name, grp, balance_nano, created_at";

pub fn create(
    pool: &Pool,
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

pub fn get(pool: &Pool, name: &str) -> Result<Account, StoreError> {
    pool.get()?
        .query_row(
            &format!("SELECT {COLS} FROM accounts WHERE name = ?1"),
            [name],
            row,
        )
        .optional()?
        .ok_or_else(|| StoreError::NotFound(format!("no account named `{name}`")))
}

pub fn list(pool: &Pool) -> Result<Vec<Account>, StoreError> {
    let c = pool.get()?;
    let mut st = c.prepare(&format!("SELECT {COLS} FROM accounts ORDER BY name"))?;
    let rows = st.query_map([], row)?.collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Adds `delta_nano` (positive) to the balance; returns the account as the update left it.
pub fn topup(pool: &Pool, name: &str, delta_nano: i64) -> Result<Account, StoreError> {
    let c = pool.get()?;
    topup_on(&c, name, delta_nano)
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

/// The [`tollgate_filters::billing::BalanceSource`] port over SQLite.
pub struct SqliteBalances(pub Pool);

impl SqliteBalances {
    /// One integer column by id, on the blocking pool.
    async fn read(&self, sql: &'static str, id: i64) -> Result<i64, String> {
        let pool = self.0.clone();
        tokio::task::spawn_blocking(move || -> Result<i64, String> {
            let c = pool.get().map_err(|e| e.to_string())?;
            c.query_row(sql, [id], |r| r.get(0))
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

#[async_trait::async_trait]
impl tollgate_filters::billing::BalanceSource for SqliteBalances {
    async fn account_balance(&self, account_id: i64) -> Result<i64, String> {
        self.read(
            "SELECT balance_nano FROM accounts WHERE id = ?1",
            account_id,
        )
        .await
    }

    async fn key_spent(&self, key_id: i64) -> Result<i64, String> {
        self.read("SELECT spent_nano FROM api_keys WHERE id = ?1", key_id)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_get_list_and_topup() {
        let (_d, pool) = crate::store::test_pool();
        create(&pool, "acme", "default", 5).unwrap();
        assert!(matches!(
            create(&pool, "acme", "default", 0),
            Err(StoreError::Conflict(_))
        ));
        let a = topup(&pool, "acme", 10).unwrap();
        assert_eq!(a.balance_nano, 15);
        assert_eq!(list(&pool).unwrap().len(), 1);
        assert!(matches!(get(&pool, "nope"), Err(StoreError::NotFound(_))));
        assert!(topup(&pool, "acme", -1).is_err());
    }
}
