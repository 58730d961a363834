//! Accounts on PostgreSQL: the statements of `store::accounts` in this dialect.

use postgres::error::SqlState;
use postgres::{GenericClient, Row};

use super::PgPool;
use crate::store::accounts::{Account, COLS};
use crate::store::{now_ms, StoreError};

fn row(r: &Row) -> Account {
    Account {
        id: r.get(0),
        name: r.get(1),
        group: r.get(2),
        balance_nano: r.get(3),
        created_at: r.get(4),
    }
}

fn not_found(name: &str) -> StoreError {
    StoreError::NotFound(format!("no account named `{name}`"))
}

pub fn create(
    pool: &PgPool,
    name: &str,
    group: &str,
    balance_nano: i64,
) -> Result<Account, StoreError> {
    let now = now_ms();
    let res = pool.get()?.query_one(
        &format!(
            "INSERT INTO accounts(name, grp, balance_nano, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $4) RETURNING {COLS}"
        ),
        &[&name, &group, &balance_nano, &now],
    );
    match res {
        Ok(r) => Ok(row(&r)),
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => Err(StoreError::Conflict(
            format!("account `{name}` already exists"),
        )),
        Err(e) => Err(e.into()),
    }
}

pub fn get(pool: &PgPool, name: &str) -> Result<Account, StoreError> {
    pool.get()?
        .query_opt(
            &format!("SELECT {COLS} FROM accounts WHERE name = $1"),
            &[&name],
        )?
        .map(|r| row(&r))
        .ok_or_else(|| not_found(name))
}

pub fn list(pool: &PgPool) -> Result<Vec<Account>, StoreError> {
    Ok(pool
        .get()?
        .query(&format!("SELECT {COLS} FROM accounts ORDER BY name"), &[])?
        .iter()
        .map(row)
        .collect())
}

/// Adds `delta_nano` (positive) on a given connection (a pooled one, or the ledger writer's
/// inside a running gateway); returns the account as the update left it.
pub fn topup_on(
    c: &mut impl GenericClient,
    name: &str,
    delta_nano: i64,
) -> Result<Account, StoreError> {
    if delta_nano <= 0 {
        return Err(StoreError::Invalid("top-up must be positive".into()));
    }
    c.query_opt(
        &format!(
            "UPDATE accounts SET balance_nano = balance_nano + $1, updated_at = $2 WHERE name = $3
             RETURNING {COLS}"
        ),
        &[&delta_nano, &now_ms(), &name],
    )?
    .map(|r| row(&r))
    .ok_or_else(|| not_found(name))
}

/// One `BIGINT` by id (`sql` takes the id as `$1`); a missing row is an error, as on SQLite.
pub fn scalar_by_id(pool: &PgPool, sql: &str, id: i64) -> Result<i64, StoreError> {
    Ok(pool.get()?.query_one(sql, &[&id])?.get(0))
}
