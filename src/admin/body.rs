//! Reading admin request bodies (USD amounts, limits, lists, expiries) and rendering the
//! accounts and keys the admin API returns.

use serde_json::{json, Value};

use super::{bad, Fail};
use crate::store::{accounts, keys, money};

/// USD from JSON: a number (its shortest decimal text) or a string, to nano-USD exactly.
fn usd_field(v: &Value, field: &str) -> Result<Option<i64>, Fail> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => money::parse_usd(&n.to_string())
            .map(Some)
            .map_err(|e| bad(format!("`{field}`: {e}"))),
        Some(Value::String(s)) => money::parse_usd(s)
            .map(Some)
            .map_err(|e| bad(format!("`{field}`: {e}"))),
        Some(_) => Err(bad(format!("`{field}` must be a USD amount"))),
    }
}

pub(super) fn str_field<'a>(v: &'a Value, field: &str) -> Result<Option<&'a str>, Fail> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(bad(format!("`{field}` must be a string"))),
    }
}

fn u32_field(v: &Value, field: &str) -> Result<Option<u32>, Fail> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| bad(format!("`{field}` must be a non-negative integer"))),
    }
}

/// A priority, 0–9 (`null`: none).
fn priority_field(v: &Value, field: &str) -> Result<Option<u8>, Fail> {
    match u32_field(v, field)? {
        Some(p) if p <= 9 => Ok(Some(p as u8)),
        Some(_) => Err(bad(format!("`{field}` must be 0 to 9"))),
        None => Ok(None),
    }
}

/// `{"gpt-4o": {"rpm": 60, "tpm": 100000}}` (`null`: none).
fn model_limits_field(
    v: &Value,
) -> Result<Option<std::collections::BTreeMap<String, tollgate_filters::limits::LimitSet>>, Fail> {
    match v.get("model_limits") {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(Default::default())),
        Some(m) => serde_json::from_value(m.clone())
            .map(Some)
            .map_err(|e| bad(format!("`model_limits`: {e}"))),
    }
}

fn list_field(v: &Value, field: &str) -> Result<Option<Vec<String>>, Fail> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| bad(format!("`{field}` must be a list of strings")))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(bad(format!("`{field}` must be a list of strings"))),
    }
}

fn nets(list: Vec<String>) -> Result<Vec<ipnet::IpNet>, Fail> {
    list.iter()
        .map(|s| {
            s.parse::<ipnet::IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| bad(format!("`{s}` is not a CIDR")))
        })
        .collect()
}

fn expiry(v: &Value) -> Result<Option<i64>, Fail> {
    str_field(v, "expires")?
        .map(|s| {
            chrono::DateTime::parse_from_rfc3339(s)
                .map(|t| t.timestamp_millis())
                .map_err(|e| bad(format!("`expires`: {e}")))
        })
        .transpose()
}

/// A body that must be a JSON object (an empty body is `{}`).
pub(super) fn json_object(buf: &[u8]) -> Result<Value, Fail> {
    if buf.is_empty() {
        return Ok(json!({}));
    }
    let v: Value = serde_json::from_slice(buf).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    if !v.is_object() {
        return Err(bad("the body must be a JSON object"));
    }
    Ok(v)
}

/// `POST /admin/accounts`: name, group, balance (nano-USD).
pub(super) fn new_account(v: &Value) -> Result<(String, String, i64), Fail> {
    let name = str_field(v, "name")?
        .ok_or_else(|| bad("`name` is required"))?
        .to_string();
    let group = str_field(v, "group")?.unwrap_or("default").to_string();
    let balance = usd_field(v, "balance_usd")?.unwrap_or(0);
    Ok((name, group, balance))
}

/// `POST /admin/accounts/{name}/topup`.
pub(super) fn topup_usd(v: &Value) -> Result<i64, Fail> {
    usd_field(v, "usd")?.ok_or_else(|| bad("`usd` is required"))
}

/// `POST /admin/keys`.
pub(super) fn new_key(v: &Value) -> Result<keys::NewKey, Fail> {
    Ok(keys::NewKey {
        account: str_field(v, "account")?
            .ok_or_else(|| bad("`account` is required"))?
            .to_string(),
        name: str_field(v, "name")?.unwrap_or_default().to_string(),
        budget_nano: usd_field(v, "budget_usd")?,
        models: list_field(v, "models")?.unwrap_or_default(),
        rpm: u32_field(v, "rpm")?,
        tpm: u32_field(v, "tpm")?,
        concurrency: u32_field(v, "concurrency")?,
        expires_at: expiry(v)?,
        allow_ips: nets(list_field(v, "allow_ips")?.unwrap_or_default())?,
        priority: priority_field(v, "priority")?,
        max_priority: priority_field(v, "max_priority")?,
        model_limits: model_limits_field(v)?.unwrap_or_default(),
    })
}

/// `PATCH /admin/keys/{id}`: absent fields stay, `null` clears.
pub(super) fn key_patch(v: &Value) -> Result<keys::KeyPatch, Fail> {
    let nullable_u32 = |f: &str| -> Result<Option<Option<u32>>, Fail> {
        if v.get(f).is_some() {
            Ok(Some(u32_field(v, f)?))
        } else {
            Ok(None)
        }
    };
    Ok(keys::KeyPatch {
        name: str_field(v, "name")?.map(str::to_owned),
        budget_nano: if v.get("budget_usd").is_some() {
            Some(usd_field(v, "budget_usd")?)
        } else {
            None
        },
        models: list_field(v, "models")?,
        rpm: nullable_u32("rpm")?,
        tpm: nullable_u32("tpm")?,
        concurrency: nullable_u32("concurrency")?,
        expires_at: if v.get("expires").is_some() {
            Some(expiry(v)?)
        } else {
            None
        },
        allow_ips: list_field(v, "allow_ips")?.map(nets).transpose()?,
        priority: match v.get("priority") {
            Some(_) => Some(priority_field(v, "priority")?),
            None => None,
        },
        max_priority: match v.get("max_priority") {
            Some(_) => Some(priority_field(v, "max_priority")?),
            None => None,
        },
        model_limits: model_limits_field(v)?,
        revoked: match v.get("revoked") {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(_) => return Err(bad("`revoked` must be a boolean")),
        },
    })
}

/// Which admin route's body [`parse_body`] reads.
#[derive(Clone, Copy, Debug)]
pub enum BodyKind {
    NewAccount,
    Topup,
    NewKey,
    KeyPatch,
}

/// Parses an admin request body exactly as the route does, without touching the store:
/// `Ok` with a summary of what was read, or the 400 message. The fuzz target and its
/// corpus replay call this.
pub fn parse_body(kind: BodyKind, buf: &[u8]) -> Result<String, String> {
    let v = json_object(buf).map_err(|f| f.2)?;
    let out = match kind {
        BodyKind::NewAccount => new_account(&v).map(|a| format!("{a:?}")),
        BodyKind::Topup => topup_usd(&v).map(|n| n.to_string()),
        BodyKind::NewKey => {
            new_key(&v).map(|k| format!("{} {:?} {:?}", k.account, k.budget_nano, k.expires_at))
        }
        BodyKind::KeyPatch => key_patch(&v).map(|p| format!("{:?} {:?}", p.budget_nano, p.revoked)),
    };
    out.map_err(|f| f.2)
}

pub(super) fn account_json(a: &accounts::Account, available: Option<i64>) -> Value {
    json!({
        "id": a.id,
        "name": a.name,
        "group": a.group,
        "balance_usd": a.balance_usd(),
        "balance_nano": a.balance_nano,
        "available_usd": available.map(money::format_usd),
        "created_at": a.created_at,
    })
}

pub(super) fn key_json(k: &keys::KeyInfo) -> Value {
    json!({
        "id": k.id,
        "account": k.account,
        "name": k.name,
        "prefix": k.prefix,
        "revoked": k.revoked,
        "expires_at": k.expires_at,
        "budget_usd": k.budget_nano.map(money::format_usd),
        "spent_usd": money::format_usd(k.spent_nano),
        "spent_nano": k.spent_nano,
        "models": k.models,
        "allow_ips": k.allow_ips,
        "rpm": k.rpm,
        "tpm": k.tpm,
        "concurrency": k.concurrency,
        "created_at": k.created_at,
        "priority": k.priority,
        "max_priority": k.max_priority,
        "model_limits": k.model_limits,
    })
}

pub(super) fn query_map(q: Option<&str>) -> std::collections::HashMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| {
            (
                k.to_string(),
                v.replace('+', " ").replace("%3A", ":").replace("%2B", "+"),
            )
        })
        .collect()
}
