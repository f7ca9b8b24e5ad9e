//! `steward quarantine list|show|release` and `steward audit`: through the
//! running daemon's control API, or against the state file directly when
//! the daemon is stopped.

use anyhow::bail;

use super::client::{self, Access};
use super::out::outln;
use crate::daemon::api::wire;
use crate::daemon::govern::{answer_offline, Request, Response};
use steward_core::config::Config;
use steward_store::governance::QuarantineEntry;

/// Builds the request (parsing arguments may fail).
pub(super) type RequestFn = Box<dyn FnOnce() -> anyhow::Result<Request>>;

/// Runs `req` and returns the answer; `comment` goes with a release into
/// the audit trail.
pub(super) async fn request(
    config: &Config,
    req: Request,
    comment: Option<String>,
) -> anyhow::Result<Response> {
    match client::access(config).await? {
        Access::Daemon(daemon) => via_api(&daemon, req, comment).await,
        Access::Store(store) => {
            let response = answer_offline(config, &store, req, comment);
            drop(store);
            response
        }
    }
}

/// The API's answer in the shape a stopped daemon's answer has.
async fn via_api(
    daemon: &client::Client,
    req: Request,
    comment: Option<String>,
) -> anyhow::Result<Response> {
    let failed = |f: client::ApiFailure| Response {
        error: Some(f.error.message),
        ..Response::default()
    };
    Ok(match req {
        // Only the daemon asks itself this (a dead-letter drop).
        Request::ForgetSent { .. } => Response {
            error: Some("not a request of the command line".to_string()),
            ..Response::default()
        },
        Request::QuarantineList { blocked_by } => {
            match daemon
                .get::<wire::QuarantineList>(&["quarantine"], &[("blocked_by", blocked_by)])
                .await?
            {
                Ok(list) => Response {
                    quarantine: list.quarantine,
                    ..Response::default()
                },
                Err(f) => failed(f),
            }
        }
        Request::QuarantineShow { entity, key } => {
            match daemon
                .get::<wire::QuarantineList>(&["quarantine", &entity, &key], &[])
                .await?
            {
                Ok(list) => Response {
                    quarantine: list.quarantine,
                    ..Response::default()
                },
                Err(f) => failed(f),
            }
        }
        Request::QuarantineRelease { entity, key } => {
            let answer = daemon
                .post::<wire::Released>(
                    &["quarantine", &entity, &key, "release"],
                    &wire::Action { comment },
                )
                .await?;
            match answer {
                Ok(released) => Response {
                    message: Some(released.message),
                    events: released.events,
                    ..Response::default()
                },
                // Still failing: the message is the outcome, as offline.
                Err(f) if f.error.code == "still_quarantined" => Response {
                    message: Some(f.error.message.clone()),
                    error: Some(f.error.message),
                    ..Response::default()
                },
                Err(f) => failed(f),
            }
        }
        Request::Record { .. } => Response {
            error: Some("a record question goes through `steward record`".to_string()),
            ..Response::default()
        },
        Request::Audit(filter) => {
            let query = [
                ("entity", filter.entity),
                ("key", filter.key),
                ("target", filter.target),
                ("decision", filter.decision),
                ("user", filter.user),
                ("since_micros", filter.since_micros.map(|s| s.to_string())),
                ("until_micros", filter.until_micros.map(|s| s.to_string())),
                ("limit", filter.limit.map(|l| l.to_string())),
            ];
            match daemon.get::<wire::AuditList>(&["audit"], &query).await? {
                Ok(list) => Response {
                    audit: list.audit,
                    ..Response::default()
                },
                Err(f) => failed(f),
            }
        }
        // The console's questions: the command line does not ask them.
        Request::Overview | Request::RecordsInState { .. } => Response {
            error: Some("not a question the command line asks".to_string()),
            ..Response::default()
        },
    })
}

/// `--since`: RFC 3339, a date (YYYY-MM-DD, UTC midnight), or a duration back from now (30m, 12h, 7d).
pub(super) fn parse_since(text: &str) -> anyhow::Result<i64> {
    parse_time("--since", text)
}

/// `--until`: as `--since`.
pub(super) fn parse_until(text: &str) -> anyhow::Result<i64> {
    parse_time("--until", text)
}

fn parse_time(flag: &str, text: &str) -> anyhow::Result<i64> {
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
        .map_err(|_| anyhow::anyhow!("{flag} `{text}`: give RFC 3339 (2026-01-31T08:00:00Z), a date (2026-01-31) or a duration (30m, 12h, 7d)"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => bail!("{flag} `{text}`: the duration unit must be s, m, h or d"),
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
        let by = a
            .user
            .as_deref()
            .map(|u| format!("  by {u}"))
            .unwrap_or_default();
        let comment = a
            .comment
            .as_deref()
            .map(|c| format!("  \"{c}\""))
            .unwrap_or_default();
        outln!(
            "{time}  {} {}  v{}  {}  {}  {}{by}{comment}",
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
