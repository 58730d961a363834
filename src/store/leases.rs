//! Credit leases in the store (see `tollgate_filters::billing::lease`): each node's slice of
//! an account's balance, in `account_leases`, summed in `accounts.leased_nano`.
//!
//! Every change is one transaction that moves a node's row and the account's sum together,
//! so `leased_nano` is always the sum of the rows, and a take is conditional on
//! `balance_nano - leased_nano`: the slices never add up to more than the balance.

use rusqlite::{params, OptionalExtension, TransactionBehavior};

use super::{now_ms, Store, StoreError};

/// How much of the free balance one take may get: at most the free balance ÷ (2 × live
/// nodes), never less than `need`, never more than `want` or the free balance.
pub fn grant(free: i64, need: i64, want: i64, live_nodes: u32) -> i64 {
    if free < need || need <= 0 {
        return 0;
    }
    let share = free / (2 * i64::from(live_nodes.max(1)));
    want.min(share).max(need).min(free)
}

/// Takes between `need` and `want` of the account's free balance for `node`, its row
/// renewed to `expires_at`; returns what was taken (0: not even `need` is free).
pub fn take(
    store: &Store,
    node: &str,
    account_id: i64,
    need: i64,
    want: i64,
    live_nodes: u32,
    expires_at: i64,
) -> Result<i64, StoreError> {
    match store {
        Store::Sqlite(pool) => {
            let mut c = pool.get()?;
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let free: Option<i64> = tx
                .query_row(
                    "SELECT balance_nano - leased_nano FROM accounts WHERE id = ?1",
                    [account_id],
                    |r| r.get(0),
                )
                .optional()?;
            let g = grant(free.unwrap_or(0), need, want, live_nodes);
            if g > 0 {
                tx.execute(
                    "UPDATE accounts SET leased_nano = leased_nano + ?1 WHERE id = ?2",
                    params![g, account_id],
                )?;
                tx.execute(
                    "INSERT INTO account_leases(account_id, node, amount_nano, expires_at)
                     VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(account_id, node) DO UPDATE
                     SET amount_nano = amount_nano + excluded.amount_nano, expires_at = excluded.expires_at",
                    params![account_id, node, g, expires_at],
                )?;
            }
            tx.commit()?;
            Ok(g)
        }
        Store::Postgres(pool) => {
            let mut c = pool.get()?;
            let mut tx = c.transaction()?;
            let free: Option<i64> = tx
                .query_opt(
                    "SELECT balance_nano - leased_nano FROM accounts WHERE id = $1 FOR UPDATE",
                    &[&account_id],
                )?
                .map(|r| r.get(0));
            let g = grant(free.unwrap_or(0), need, want, live_nodes);
            if g > 0 {
                tx.execute(
                    "UPDATE accounts SET leased_nano = leased_nano + $1 WHERE id = $2",
                    &[&g, &account_id],
                )?;
                tx.execute(
                    "INSERT INTO account_leases(account_id, node, amount_nano, expires_at)
                     VALUES ($1, $2, $3, $4)
                     ON CONFLICT (account_id, node) DO UPDATE
                     SET amount_nano = account_leases.amount_nano + EXCLUDED.amount_nano,
                         expires_at = EXCLUDED.expires_at",
                    &[&account_id, &node, &g, &expires_at],
                )?;
            }
            tx.commit()?;
            Ok(g)
        }
    }
}

/// Gives `amount` of `node`'s slice back (never more than the row holds).
pub fn give_back(
    store: &Store,
    node: &str,
    account_id: i64,
    amount: i64,
) -> Result<(), StoreError> {
    match store {
        Store::Sqlite(pool) => {
            let mut c = pool.get()?;
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let held: Option<i64> = tx
                .query_row(
                    "SELECT amount_nano FROM account_leases WHERE account_id = ?1 AND node = ?2",
                    params![account_id, node],
                    |r| r.get(0),
                )
                .optional()?;
            let back = amount.min(held.unwrap_or(0)).max(0);
            if back > 0 {
                tx.execute(
                    "UPDATE account_leases SET amount_nano = amount_nano - ?1 WHERE account_id = ?2 AND node = ?3",
                    params![back, account_id, node],
                )?;
                tx.execute(
                    "UPDATE accounts SET leased_nano = MAX(leased_nano - ?1, 0) WHERE id = ?2",
                    params![back, account_id],
                )?;
            }
            tx.execute(
                "DELETE FROM account_leases WHERE account_id = ?1 AND node = ?2 AND amount_nano <= 0",
                params![account_id, node],
            )?;
            tx.commit()?;
            Ok(())
        }
        Store::Postgres(pool) => {
            let mut c = pool.get()?;
            let mut tx = c.transaction()?;
            let held: Option<i64> = tx
                .query_opt(
                    "SELECT amount_nano FROM account_leases WHERE account_id = $1 AND node = $2 FOR UPDATE",
                    &[&account_id, &node],
                )?
                .map(|r| r.get(0));
            let back = amount.min(held.unwrap_or(0)).max(0);
            if back > 0 {
                tx.execute(
                    "UPDATE account_leases SET amount_nano = amount_nano - $1 WHERE account_id = $2 AND node = $3",
                    &[&back, &account_id, &node],
                )?;
                tx.execute(
                    "UPDATE accounts SET leased_nano = GREATEST(leased_nano - $1, 0) WHERE id = $2",
                    &[&back, &account_id],
                )?;
            }
            tx.execute(
                "DELETE FROM account_leases WHERE account_id = $1 AND node = $2 AND amount_nano <= 0",
                &[&account_id, &node],
            )?;
            tx.commit()?;
            Ok(())
        }
    }
}

/// Extends every row of `node` to `expires_at`.
pub fn renew(store: &Store, node: &str, expires_at: i64) -> Result<(), StoreError> {
    match store {
        Store::Sqlite(pool) => {
            pool.get()?.execute(
                "UPDATE account_leases SET expires_at = ?1 WHERE node = ?2",
                params![expires_at, node],
            )?;
        }
        Store::Postgres(pool) => {
            pool.get()?.execute(
                "UPDATE account_leases SET expires_at = $1 WHERE node = $2",
                &[&expires_at, &node],
            )?;
        }
    }
    Ok(())
}

/// Gives back the slices of nodes that stopped renewing (expired before now). Returns the
/// rows reclaimed.
pub fn reclaim_expired(store: &Store) -> Result<usize, StoreError> {
    let now = now_ms();
    match store {
        Store::Sqlite(pool) => {
            let mut c = pool.get()?;
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let n = tx.execute(
                "UPDATE accounts SET leased_nano = MAX(leased_nano - (
                    SELECT COALESCE(SUM(amount_nano), 0) FROM account_leases l
                    WHERE l.account_id = accounts.id AND l.expires_at < ?1), 0)
                 WHERE id IN (SELECT account_id FROM account_leases WHERE expires_at < ?1)",
                [now],
            )?;
            let rows = tx.execute("DELETE FROM account_leases WHERE expires_at < ?1", [now])?;
            tx.commit()?;
            let _ = n;
            Ok(rows)
        }
        Store::Postgres(pool) => {
            let mut c = pool.get()?;
            let mut tx = c.transaction()?;
            let gone = tx.query(
                "DELETE FROM account_leases WHERE expires_at < $1 RETURNING account_id, amount_nano",
                &[&now],
            )?;
            for r in &gone {
                let (account, amount): (i64, i64) = (r.get(0), r.get(1));
                tx.execute(
                    "UPDATE accounts SET leased_nano = GREATEST(leased_nano - $1, 0) WHERE id = $2",
                    &[&amount, &account],
                )?;
            }
            tx.commit()?;
            Ok(gone.len())
        }
    }
}

/// An account's balance less what every node holds: what a new slice can come from.
#[cfg(test)]
fn unleased(store: &Store, account_id: i64) -> Result<i64, StoreError> {
    Ok(match store {
        Store::Sqlite(pool) => pool.get()?.query_row(
            "SELECT balance_nano - leased_nano FROM accounts WHERE id = ?1",
            [account_id],
            |r| r.get(0),
        )?,
        Store::Postgres(pool) => pool
            .get()?
            .query_one(
                "SELECT balance_nano - leased_nano FROM accounts WHERE id = $1",
                &[&account_id],
            )?
            .get(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::accounts;

    #[test]
    fn grants_share_the_free_balance_and_never_exceed_it() {
        assert_eq!(grant(1_000, 10, 10_000, 1), 500);
        assert_eq!(grant(1_000, 10, 10_000, 5), 100);
        assert_eq!(grant(1_000, 10, 50, 1), 50);
        assert_eq!(
            grant(15, 10, 100, 3),
            10,
            "low balance: exactly what is needed"
        );
        assert_eq!(grant(9, 10, 100, 1), 0);
        assert_eq!(grant(100, 0, 100, 1), 0);
    }

    #[test]
    fn slices_add_up_to_the_leased_sum_and_expire_back() {
        crate::store::testing::each_store(|store| {
            let a = accounts::create(store, "acme", "default", 1_000).unwrap();
            let later = now_ms() + 60_000;
            assert_eq!(take(store, "n1", a.id, 100, 100, 2, later).unwrap(), 100);
            assert_eq!(take(store, "n2", a.id, 10, 10_000, 2, later).unwrap(), 225);
            assert_eq!(unleased(store, a.id).unwrap(), 675);
            assert_eq!(take(store, "n1", a.id, 700, 700, 1, later).unwrap(), 0);
            give_back(store, "n1", a.id, 60).unwrap();
            assert_eq!(unleased(store, a.id).unwrap(), 735);
            // Giving back more than the row holds gives back the row.
            give_back(store, "n1", a.id, 1_000).unwrap();
            assert_eq!(unleased(store, a.id).unwrap(), 775);
            // n2 stops renewing: its slice comes back once expired.
            renew(store, "n2", now_ms() - 1).unwrap();
            assert_eq!(reclaim_expired(store).unwrap(), 1);
            assert_eq!(unleased(store, a.id).unwrap(), 1_000);
            assert_eq!(reclaim_expired(store).unwrap(), 0);
        });
    }
}
