//! `steward quarantine list|show|release` and `steward audit`: against the
//! state file directly when the daemon is stopped, or through a request
//! file the running daemon answers within 2 s (redb admits one process).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::out::outln;
use crate::daemon::govern::{answer_offline, requests_dir, Request, Response};
use steward_core::config::Config;
use steward_store::governance::QuarantineEntry;
use steward_store::{Store, StoreError};

/// Builds the request (parsing arguments may fail).
pub(super) type RequestFn = Box<dyn FnOnce() -> anyhow::Result<Request>>;

/// Runs `req` and returns the answer.
pub(super) fn request(config: &Config, req: Request) -> anyhow::Result<Response> {
    // A running daemon answers: opening the state file could make it wait.
    if crate::daemon::status::running_daemon(config).is_some() {
        return via_daemon(config, &req);
    }
    match Store::open(&config.state.path) {
        Ok(store) => answer_offline(config, &store, req),
        Err(StoreError::Locked { .. }) => via_daemon(config, &req),
        Err(e) => Err(e.into()),
    }
}

/// How long a running daemon may take to pick up a request (it looks every second).
const PICK_UP: Duration = Duration::from_secs(15);

fn via_daemon(config: &Config, req: &Request) -> anyhow::Result<Response> {
    via_daemon_within(config, req, PICK_UP)
}

/// Hands `req` to the running daemon; once it has taken the request, waits
/// up to `work` (from the start) for the answer.
pub(super) fn via_daemon_within(
    config: &Config,
    req: &Request,
    work: Duration,
) -> anyhow::Result<Response> {
    let dir = requests_dir(config);
    steward_store::files::create_dir_all(&dir)
        .with_context(|| format!("cannot create the request directory {}", dir.display()))?;
    let id = format!(
        "{}-{}",
        std::process::id(),
        chrono::Utc::now().timestamp_micros()
    );
    let tmp = dir.join(format!("{id}.tmp"));
    let path = dir.join(format!("{id}.req"));
    steward_store::files::write_atomically(&tmp, &path, &serde_json::to_vec(req)?)
        .with_context(|| format!("cannot write the request {}", path.display()))?;
    let resp = dir.join(format!("{id}.resp"));
    let start = Instant::now();
    loop {
        if let Ok(bytes) = std::fs::read(&resp) {
            let _ = std::fs::remove_file(&resp);
            return Ok(serde_json::from_slice(&bytes)?);
        }
        let waiting = path.exists();
        if waiting && start.elapsed() > PICK_UP {
            let _ = std::fs::remove_file(&path);
            bail!(
                "the state file is in use but no daemon answered within {} s; is `steward run` for {} healthy?",
                PICK_UP.as_secs(),
                config.state.path.display()
            )
        }
        if !waiting && start.elapsed() > work.max(PICK_UP) {
            bail!(
                "the daemon took the request but did not answer within {} s; see its log",
                work.as_secs()
            )
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `--since`: RFC 3339, a date (YYYY-MM-DD, UTC midnight), or a duration back from now (30m, 12h, 7d).
pub(super) fn parse_since(text: &str) -> anyhow::Result<i64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(t.timestamp_micros());
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        if let Some(t) = d.and_hms_opt(0, 0, 0) {
            return Ok(t.and_utc().timestamp_micros());
        }
    }
    let (num, unit) = text.split_at(text.len().saturating_sub(1));
    let n: i64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("--since `{text}`: give RFC 3339 (2026-01-31T08:00:00Z), a date (2026-01-31) or a duration (30m, 12h, 7d)"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => bail!("--since `{text}`: the duration unit must be s, m, h or d"),
    };
    Ok(chrono::Utc::now().timestamp_micros() - secs * 1_000_000)
}

/// Prints the answer; a reader closing the pipe early ends the command
/// quietly (see `out`).
pub(super) fn print(mut resp: Response, json: bool) -> anyhow::Result<bool> {
    resp.quarantine
        .sort_by(|a, b| quarantine_order(a).cmp(&quarantine_order(b)));
    if json {
        outln!("{}", serde_json::to_string_pretty(&resp)?);
        return Ok(resp.error.is_none());
    }
    for q in &resp.quarantine {
        let blocked = q
            .blocked_by
            .as_deref()
            .map(|b| format!("  blocked by={b}"))
            .unwrap_or_default();
        outln!(
            "{} {}  rule={}  version={}  since={}{blocked}\n  {}",
            q.entity,
            q.key,
            q.rule,
            q.version,
            q.since,
            q.message
        );
    }
    for a in &resp.audit {
        let time = chrono::DateTime::from_timestamp_micros(a.time_micros)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .unwrap_or_default();
        outln!(
            "{time}  {} {}  v{}  {}  {}  {}",
            a.entity,
            a.key,
            a.version,
            a.target.as_deref().unwrap_or("-"),
            a.decision,
            a.detail
        );
    }
    if let Some(m) = &resp.message {
        outln!("{m}");
    }
    if let Some(e) = &resp.error {
        if resp.message.as_ref() != Some(e) {
            eprintln!("error: {e}");
        }
        return Ok(false);
    }
    Ok(true)
}

/// Entity, then key: numeric keys in numeric order (`2` before `10`), then
/// the others in text order. (A comparison that is numeric only when both
/// keys are numbers would not be a total order: `2` < `10` < `1a` < `2`.)
fn quarantine_order(q: &QuarantineEntry) -> (&str, bool, i128, &str) {
    let number = q.key.parse::<i128>().ok();
    (&q.entity, number.is_none(), number.unwrap_or(0), &q.key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quarantine_keys_sort_numerically_then_as_text() {
        let entry = |entity: &str, key: &str| -> QuarantineEntry {
            serde_json::from_value(serde_json::json!({
                "entity": entity, "key": key, "version": 1, "rule": "r",
                "message": "m", "document": null, "since": ""
            }))
            .unwrap()
        };
        let mut list = [
            entry("product", "10"),
            entry("product", "1a"),
            entry("bom", "7"),
            entry("product", "2"),
            entry("product", "-3"),
            entry("product", "abc"),
        ];
        list.sort_by(|a, b| quarantine_order(a).cmp(&quarantine_order(b)));
        let keys: Vec<String> = list
            .iter()
            .map(|q| format!("{} {}", q.entity, q.key))
            .collect();
        assert_eq!(
            keys,
            [
                "bom 7",
                "product -3",
                "product 2",
                "product 10",
                "product 1a",
                "product abc"
            ]
        );
    }
}
