//! The end of a soak: the ledger, the balances and what the mock served, reconciled.

use super::*;

/// Tokens of the `,"stream_options":{"include_usage":true}` tollgate adds to a stream whose
/// client did not ask for usage (39 bytes / 4, rounded up): its prompt estimate covers them.
const INJECTED_TOKENS: u64 = 10;

pub(super) struct Row {
    key_id: i64,
    account_id: i64,
    model: String,
    channel: Option<String>,
    prompt: u64,
    completion: u64,
    cached: u64,
    cost: i64,
    estimated: bool,
}

#[allow(
    clippy::too_many_arguments,
    reason = "one call site; the run's whole state"
)]
pub(super) fn reconcile(
    report: &mut Report,
    opts: &Options,
    db: &Path,
    sent: &[Sent],
    keys: &[KeyInfo],
    seen: &MockSeen,
    initial: &[i64],
    topups: &[i64],
    group_of_account: &HashMap<i64, &'static str>,
    killed_at: Option<Instant>,
) {
    let conn =
        match rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        {
            Ok(c) => c,
            Err(e) => {
                report.fail(format!("open {}: {e}", db.display()));
                return;
            }
        };
    let mut rows: HashMap<String, Row> = HashMap::new();
    let q = conn.prepare(
        "SELECT request_id, key_id, account_id, model, channel, prompt_tokens, completion_tokens, cached_tokens, cost_nano, estimated FROM usage_ledger",
    );
    match q.and_then(|mut st| {
        let it = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                Row {
                    key_id: r.get::<_, Option<i64>>(1)?.unwrap_or(-1),
                    account_id: r.get::<_, Option<i64>>(2)?.unwrap_or(-1),
                    model: r.get(3)?,
                    channel: r.get(4)?,
                    prompt: r.get::<_, i64>(5)? as u64,
                    completion: r.get::<_, i64>(6)? as u64,
                    cached: r.get::<_, i64>(7)? as u64,
                    cost: r.get(8)?,
                    estimated: r.get::<_, i64>(9)? != 0,
                },
            ))
        })?;
        for r in it {
            let (id, row) = r?;
            rows.insert(id, row);
        }
        Ok(())
    }) {
        Ok(()) => {}
        Err(e) => {
            report.fail(format!("read ledger: {e}"));
            return;
        }
    }
    let final_balances: HashMap<String, i64> = conn
        .prepare("SELECT name, balance_nano FROM accounts")
        .and_then(|mut st| {
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()
        })
        .unwrap_or_default();
    let spent: i64 = conn
        .query_row(
            "SELECT COALESCE(SUM(spent_nano), 0) FROM api_keys",
            [],
            |r| r.get(0),
        )
        .unwrap_or(-1);
    let over_budget: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM api_keys WHERE budget_nano IS NOT NULL AND spent_nano > budget_nano",
            [],
            |r| r.get(0),
        )
        .unwrap_or(-1);

    let key_index: HashMap<i64, usize> = keys.iter().enumerate().map(|(i, k)| (k.id, i)).collect();
    let group_of_key = |key_id: i64| -> &'static str {
        key_index
            .get(&key_id)
            .map(|&i| ACCOUNTS[keys[i].account].group)
            .unwrap_or("default")
    };

    // 1. Every row's cost is the price of its own tokens.
    let mut ledger_sum = 0i64;
    let mut estimated_rows = 0u64;
    let mut capped = 0u64;
    for (id, r) in &rows {
        ledger_sum += r.cost;
        estimated_rows += u64::from(r.estimated);
        let group = group_of_account
            .get(&r.account_id)
            .copied()
            .unwrap_or("default");
        let want = price(&r.model, group, r.prompt, r.completion, r.cached);
        if r.cost != want {
            if r.cost < want {
                capped += 1;
            }
            report.fail(format!(
                "row {id}: cost {} but {} × ({}, {}, {}) prices {want}",
                r.cost, r.model, r.prompt, r.completion, r.cached
            ));
        }
    }

    // 2. Rows the client can name (it saw x-request-id).
    let mut rid_to_marker: HashMap<&str, usize> = HashMap::new();
    for (m, s) in sent.iter().enumerate() {
        if let Some(rid) = &s.rid {
            if rid_to_marker.insert(rid.as_str(), m).is_some() {
                report.fail(format!("request id {rid} seen on two requests"));
            }
        }
    }
    let mut served_price = 0i64;
    for (m, (model, p, c, k)) in &seen.served {
        if let Some(s) = sent.get(*m as usize) {
            served_price += price(model, ACCOUNTS[keys[s.key].account].group, *p, *c, *k);
        }
    }
    for m in &seen.served_twice {
        report.fail(format!("soak-{m}: the provider served usage twice"));
    }
    let mut resent = 0u64;
    for (m, n) in &seen.reached {
        if let Some(s) = sent.get(*m as usize) {
            if *n > 1 && s.fault.resent_after_reset() {
                resent += 1;
                report.fail(format!(
                    "soak-{m} reached the provider {n} times after a reset that followed its body"
                ));
            } else if *n > 1 && !s.fault.may_repeat() {
                report.fail(format!(
                    "soak-{m} ({:?}) reached the provider {n} times",
                    s.fault
                ));
            }
        }
    }

    // The README's bound: prompt = body bytes / 4 + 1, and 10 more for a stream (the
    // `stream_options` tollgate adds when the client did not ask for usage); completion
    // never above n × max_tokens (n = 1 here). Text bytes / 4 is not checked: for a JSON
    // body without usage the body's bytes stand in for the text.
    let estimate_ok = |r: &Row, body_len: usize, stream: bool| -> bool {
        let injected = if stream { INJECTED_TOKENS } else { 0 };
        r.prompt <= body_len as u64 / 4 + 1 + injected && r.completion <= MAX_TOKENS
    };

    let mut matched = 0u64;
    let mut served_matched = 0u64;
    let mut lost: Vec<(usize, &str)> = Vec::new();
    for (rid, &m) in &rid_to_marker {
        let s = &sent[m];
        let reached = seen.reached.get(&(m as u64)).copied().unwrap_or(0) > 0;
        let served = seen.served.get(&(m as u64));
        let Some(r) = rows.get(*rid) else {
            // Refusals before the body (rpm, concurrency) leave no row; only requests that
            // reached the provider must have one.
            if reached {
                lost.push((m, "named"));
            }
            continue;
        };
        matched += 1;
        if r.key_id != keys[s.key].id {
            report.fail(format!(
                "row {rid}: key {} but soak-{m} used key {}",
                r.key_id, keys[s.key].id
            ));
        }
        match served {
            Some((_, p, c, k)) => {
                served_matched += 1;
                if r.estimated || (r.prompt, r.completion, r.cached) != (*p, *c, *k) {
                    report.fail(format!(
                        "row {rid} (soak-{m}, {:?}): ({}, {}, {}, estimated {}) but the provider served ({p}, {c}, {k})",
                        s.fault, r.prompt, r.completion, r.cached, r.estimated
                    ));
                }
            }
            None if reached => {
                if r.cost != 0 && !(r.estimated && estimate_ok(r, s.body_len, s.stream)) {
                    report.fail(format!(
                        "row {rid} (soak-{m}, {:?}): charged {} for ({}, {}), estimated {}, with no usage served",
                        s.fault, r.cost, r.prompt, r.completion, r.estimated
                    ));
                }
            }
            None => {
                if r.cost != 0 {
                    report.fail(format!(
                        "row {rid} (soak-{m}, {:?}): charged {} but never reached the provider",
                        s.fault, r.cost
                    ));
                }
            }
        }
    }

    // 3. Rows nobody could name (the client left before the head, or lost it to a kill):
    // matched per key against requests without an id that reached the provider.
    let named: std::collections::HashSet<&str> = rid_to_marker.keys().copied().collect();
    let mut pool_served: HashMap<i64, Vec<(String, u64, u64, u64)>> = HashMap::new();
    let mut pool_reached: HashMap<i64, Vec<usize>> = HashMap::new();
    for (m, s) in sent.iter().enumerate() {
        if s.rid.is_some() {
            continue;
        }
        let key_id = keys[s.key].id;
        if seen.reached.get(&(m as u64)).copied().unwrap_or(0) > 0 {
            pool_reached.entry(key_id).or_default().push(m);
        }
        if let Some((model, p, c, k)) = seen.served.get(&(m as u64)) {
            pool_served
                .entry(key_id)
                .or_default()
                .push((model.clone(), *p, *c, *k));
        }
    }
    let mut unnamed_rows = 0u64;
    let mut unnamed_touched: HashMap<i64, u64> = HashMap::new();
    for (id, r) in &rows {
        if named.contains(id.as_str()) {
            continue;
        }
        unnamed_rows += 1;
        if r.channel.is_some() {
            *unnamed_touched.entry(r.key_id).or_default() += 1;
        }
        if r.cost == 0 {
            continue;
        }
        if !r.estimated {
            let pool = pool_served.entry(r.key_id).or_default();
            if let Some(i) = pool.iter().position(|(model, p, c, k)| {
                *model == r.model && (*p, *c, *k) == (r.prompt, r.completion, r.cached)
            }) {
                pool.swap_remove(i);
                served_matched += 1;
            } else {
                report.fail(format!(
                    "row {id} (unnamed, key {}): ({}, {}, {}) matches no usage the provider served to that key",
                    r.key_id, r.prompt, r.completion, r.cached
                ));
            }
        } else {
            let reached = pool_reached.get(&r.key_id);
            let max_body = reached
                .and_then(|v| v.iter().map(|&m| sent[m].body_len).max())
                .unwrap_or(0);
            let any_stream = reached.is_some_and(|v| v.iter().any(|&m| sent[m].stream));
            if !estimate_ok(r, max_body, any_stream) {
                report.fail(format!(
                    "row {id} (unnamed, estimated): ({}, {}) out of bounds",
                    r.prompt, r.completion
                ));
            }
        }
    }

    // 4. Losses: only inside the SIGKILL window.
    let window = opts.kill_window;
    let in_window = |s: &Sent| -> Option<&'static str> {
        let k = killed_at?;
        let f = s.finished?;
        if s.started <= k && f >= k {
            Some("in flight at the kill")
        } else if f <= k && k.duration_since(f) <= window {
            Some("completed within the window")
        } else {
            None
        }
    };
    let mut lost_window = 0u64;
    let mut lost_inflight = 0u64;
    let mut oldest = Duration::ZERO;
    let mut count_loss = |report: &mut Report, m: usize, what: &str| {
        let s = &sent[m];
        match in_window(s) {
            Some("in flight at the kill") => lost_inflight += 1,
            Some(_) => {
                lost_window += 1;
                if let (Some(k), Some(f)) = (killed_at, s.finished) {
                    oldest = oldest.max(k.saturating_duration_since(f));
                }
            }
            None => report.fail(format!(
                "soak-{m} ({:?}, {what}, status {:?}, {:?}): no ledger row, outside the SIGKILL window",
                s.fault, s.status, s.outcome
            )),
        }
    };
    let mut lost_served_price = 0i64;
    let group_of_marker = |m: usize| ACCOUNTS[keys[sent[m].key].account].group;
    for (m, what) in &lost {
        count_loss(report, *m, what);
        if let Some((model, p, c, k)) = seen.served.get(&(*m as u64)) {
            lost_served_price += price(model, group_of_marker(*m), *p, *c, *k);
        }
    }
    // Unnamed requests that were served usage but have no row.
    for (key_id, left) in &pool_served {
        if left.is_empty() {
            continue;
        }
        let mut candidates: Vec<usize> = pool_reached
            .get(key_id)
            .map(|v| {
                v.iter()
                    .copied()
                    .filter(|&m| in_window(&sent[m]).is_some())
                    .collect()
            })
            .unwrap_or_default();
        for (model, p, c, k) in left {
            lost_served_price += price(model, group_of_key(*key_id), *p, *c, *k);
            match candidates.pop() {
                Some(m) => count_loss(report, m, "unnamed, served"),
                None => report.fail(format!(
                    "key {key_id}: usage served to a request without an id, and no ledger row for it"
                )),
            }
        }
    }
    let reached_unnamed: u64 = pool_reached.values().map(|v| v.len() as u64).sum();
    let touched_unnamed: u64 = unnamed_touched.values().sum();
    for (key_id, v) in &pool_reached {
        let rows_k = unnamed_touched.get(key_id).copied().unwrap_or(0);
        if rows_k > v.len() as u64 {
            report.fail(format!(
                "key {key_id}: {rows_k} unnamed rows reached a channel but only {} unnamed requests reached the provider (a duplicate?)",
                v.len()
            ));
        }
    }

    // 5. Money: ledger = balances = key spend; nothing below zero.
    let mut decrease = 0i64;
    for (ai, a) in ACCOUNTS.iter().enumerate() {
        let fin = final_balances.get(a.name).copied().unwrap_or(i64::MIN);
        if fin < 0 {
            report.fail(format!("account {} below zero: {fin}", a.name));
        }
        decrease += initial[ai] + topups[ai] - fin;
    }
    if ledger_sum != decrease {
        report.fail(format!(
            "Σ ledger {ledger_sum} ≠ Σ balance decrease {decrease}"
        ));
    }
    if ledger_sum != spent {
        report.fail(format!("Σ ledger {ledger_sum} ≠ Σ key spend {spent}"));
    }
    if over_budget != 0 {
        report.fail(format!("{over_budget} keys spent past their budget"));
    }
    let estimated_sum: i64 = rows.values().filter(|r| r.estimated).map(|r| r.cost).sum();
    if ledger_sum - estimated_sum + lost_served_price != served_price {
        report.fail(format!(
            "reported-usage rows charge {} and lost rows {lost_served_price}, but the provider served {served_price} worth",
            ledger_sum - estimated_sum
        ));
    }

    let count = |f: &dyn Fn(&Sent) -> bool| sent.iter().filter(|s| f(s)).count();
    report.line("requests sent", sent.len());
    report.line(
        "  outcomes",
        format!(
            "complete {} / broken stream {} / refused (non-200) {} / no response {} / client left {}",
            count(&|s| s.outcome == Some(Outcome::Complete)),
            count(&|s| s.outcome == Some(Outcome::Broken)),
            count(&|s| s.outcome == Some(Outcome::Refused)),
            count(&|s| s.outcome == Some(Outcome::Transport)),
            count(&|s| s.outcome == Some(Outcome::Left)),
        ),
    );
    let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
    for s in sent {
        if let Some(st) = s.status {
            *statuses.entry(st).or_default() += 1;
        }
    }
    report.line(
        "  statuses",
        statuses
            .iter()
            .map(|(k, v)| format!("{k}:{v}"))
            .collect::<Vec<_>>()
            .join(" "),
    );
    report.line(
        "  streaming",
        format!(
            "{:.1} %",
            100.0 * count(&|s| s.stream) as f64 / sent.len().max(1) as f64
        ),
    );
    report.line("reached the provider (markers)", seen.reached.len());
    report.line("provider served usage (markers)", seen.served.len());
    report.line(
        "POSTs resent to the next channel after a provider reset post-body",
        resent,
    );
    report.line("ledger rows", rows.len());
    report.line(
        "  named by x-request-id / matched",
        format!("{} / {matched}", rid_to_marker.len()),
    );
    report.line(
        "  unnamed rows / with a channel / unnamed requests that reached the provider",
        format!("{unnamed_rows} / {touched_unnamed} / {reached_unnamed}"),
    );
    report.line(
        "  estimated rows (Σ nano-USD)",
        format!("{estimated_rows} ({estimated_sum})"),
    );
    report.line("  served usages matched to a row", served_matched);
    report.line("  rows charged below their price (capped)", capped);
    report.line("Σ ledger cost (nano-USD)", ledger_sum);
    report.line("Σ balance decrease (nano-USD)", decrease);
    report.line("Σ key spend (nano-USD)", spent);
    report.line("Σ mock-served price (nano-USD)", served_price);
    report.line(
        "Σ ledger cost of reported-usage rows",
        ledger_sum - estimated_sum,
    );
    report.line(
        "  + Σ price of served usage whose row was lost",
        lost_served_price,
    );
    report.line(
        "rows lost (SIGKILL)",
        format!(
            "{} completed ≤ {:?} before the kill (oldest {:?}), {} in flight at the kill",
            lost_window, window, oldest, lost_inflight
        ),
    );
    let _ = named;
}
