//! `steward record -c FILE ENTITY KEY [--json]`: everything steward knows
//! about one record, through the running daemon's API, or from the state
//! file (and a live read of the source) when the daemon is stopped.

use std::fmt::Write as _;
use std::path::Path;

use super::client::{self, Access};
use super::out::text;
use crate::daemon::api::wire::{self, DeliveryState, RowOrigin};
use crate::daemon::govern::{answer_offline, Request};
use crate::daemon::record;
use steward_core::config::Config;
use steward_core::pipeline::govern::{RecordState, TargetDecision};

/// Audit lines shown in the text form (`--json` has up to 50).
const AUDIT_LINES: usize = 10;

pub(super) async fn run(
    path: &Path,
    config: Config,
    entity: String,
    key: String,
    json: bool,
) -> anyhow::Result<()> {
    let answer = match client::access(&config).await? {
        Access::Daemon(daemon) => match daemon
            .get::<wire::Record>(&["record", &entity, &key], &[])
            .await?
        {
            Ok(record) => record,
            Err(f) => anyhow::bail!("{}", f.error.message),
        },
        Access::Store(store) => {
            if config.entity(&entity).is_none() {
                let names: Vec<&str> = config.entities.iter().map(|e| e.name.as_str()).collect();
                anyhow::bail!(
                    "no entity `{entity}` in {}; configured entities: {}",
                    path.display(),
                    names.join(", ")
                );
            }
            let request = Request::Record {
                entity: entity.clone(),
                key: key.clone(),
            };
            let response = answer_offline(&config, &store, request, None)?;
            let Some(status) = response.record else {
                anyhow::bail!("{}", response.error.unwrap_or_default());
            };
            let live = record::live_row(&config, &entity, &key).await;
            let mut answer = record::assemble(&config, &store, *status, Some(live))?;
            let stopped = "the daemon is not running: the answer comes from the state file";
            answer.note = Some(match answer.note {
                Some(n) => format!("{stopped}; {n}"),
                None => stopped.to_string(),
            });
            answer
        }
    };
    if json {
        text(&format!("{}\n", serde_json::to_string_pretty(&answer)?));
    } else {
        text(&render(path, &answer));
    }
    Ok(())
}

/// The readable form: the state line first, then the source row, each
/// target, the diff, links to related records and the last audit lines.
pub(crate) fn render(config: &Path, r: &wire::Record) -> String {
    let s = &r.status;
    let mut out = String::new();
    let hint =
        |entity: &str, key: &str| format!("steward record -c {} {entity} {key}", config.display());
    let _ = writeln!(out, "{} {}: {}", s.entity, s.key, state_line(r));
    if let Some(note) = &r.note {
        let _ = writeln!(out, "  note: {note}");
    }

    match (&r.source.origin, &r.source.row) {
        (RowOrigin::Live, Some(row)) => {
            let _ = writeln!(out, "\nsource row (live): {}", compact(row));
            match &r.source.differs_from_last_read {
                Some(cols) if !cols.is_empty() => {
                    let _ = writeln!(
                        out,
                        "  differs from the row steward last read in: {}",
                        cols.join(", ")
                    );
                }
                Some(_) => {
                    let _ = writeln!(out, "  same as the row steward last read");
                }
                None => {}
            }
        }
        (RowOrigin::LastRead, Some(row)) => {
            let _ = writeln!(
                out,
                "\nsource row (as steward last read it): {}",
                compact(row)
            );
            if let Some(e) = &r.source.live_error {
                let _ = writeln!(out, "  not read live: {e}");
            }
        }
        _ => {
            let why = r.source.live_error.as_deref().map_or_else(
                || "no such row in the database".to_string(),
                |e| format!("not read live: {e}"),
            );
            let _ = writeln!(out, "\nsource row: none ({why})");
        }
    }

    if !s.targets.is_empty() {
        let _ = writeln!(out, "\ntargets:");
    }
    for t in &s.targets {
        let delivery = r.delivery.iter().find(|d| d.target == t.target);
        let mut line = format!("  {}: {}", t.target, decision(t.decision));
        match t.up_to_date {
            Some(true) => line.push_str(", up to date"),
            Some(false) => line.push_str(", NOT up to date (it has an earlier version)"),
            None => {}
        }
        let _ = writeln!(out, "{line}");
        if let Some(d) = delivery {
            if let Some(a) = &d.last_appended {
                let _ = writeln!(out, "    last appended: {}", appended(a));
            }
            match (&d.last_acknowledged, &d.last_appended) {
                (Some(a), Some(last)) if a.version != last.version || a.seq != last.seq => {
                    let _ = writeln!(out, "    last acknowledged: {}", appended(a));
                }
                (None, Some(_)) => {
                    let _ = writeln!(out, "    last acknowledged: none known");
                }
                _ => {}
            }
            for dl in &d.dead_letters {
                let _ = writeln!(
                    out,
                    "    dead letter {} (version {}): {}  → steward dlq show -c {} --target {} {}",
                    dl.id,
                    steward_core::model::Lsn(dl.version),
                    dl.error,
                    config.display(),
                    t.target,
                    dl.id
                );
            }
        }
        if let Some(diff) = &t.diff {
            if diff.is_empty() {
                let _ = writeln!(out, "    withheld document: same as delivered");
            } else {
                let _ = writeln!(out, "    withheld vs delivered:");
                for (f, c) in &diff.changed {
                    let _ = writeln!(
                        out,
                        "      ~ {f}: {} → {}",
                        compact(&c.delivered),
                        compact(&c.withheld)
                    );
                }
                for (f, v) in &diff.added {
                    let _ = writeln!(out, "      + {f}: {}", compact(v));
                }
                for (f, v) in &diff.removed {
                    let _ = writeln!(out, "      - {f}: {}", compact(v));
                }
            }
            if !diff.hidden.is_empty() {
                let _ = writeln!(
                    out,
                    "      (not compared, the target's policy hides them: {})",
                    diff.hidden.join(", ")
                );
            }
        } else if let Some(note) = &t.diff_note {
            let _ = writeln!(out, "    no diff: {note}");
        }
    }

    if !s.blocked_by.is_empty() {
        let _ = writeln!(out, "\nwaits for:");
        for b in &s.blocked_by {
            let _ = writeln!(
                out,
                "  {} {} ({}; rule {})  → {}",
                b.entity,
                b.key,
                state_name(b.state),
                b.rule,
                hint(&b.entity, &b.key)
            );
        }
    }
    if !s.blocks.is_empty() {
        let _ = writeln!(out, "\nblocks:");
        for b in &s.blocks {
            let _ = writeln!(
                out,
                "  {} {} (rule {})  → {}",
                b.entity,
                b.key,
                b.via,
                hint(&b.entity, &b.key)
            );
        }
    }
    if !s.dependents.is_empty() {
        let _ = writeln!(
            out,
            "\nused by {} record(s){}:",
            s.dependents_total,
            if s.dependents_total > s.dependents.len() {
                format!(", the first {}", s.dependents.len())
            } else {
                String::new()
            }
        );
        for d in s.dependents.iter().take(AUDIT_LINES) {
            let _ = writeln!(
                out,
                "  {} {} (via {}, {})  → {}",
                d.entity,
                d.key,
                d.via,
                state_name(d.state),
                hint(&d.entity, &d.key)
            );
        }
    }

    if !r.audit.is_empty() {
        let _ = writeln!(out, "\naudit (newest first):");
        for a in r.audit.iter().take(AUDIT_LINES) {
            let time = chrono::DateTime::from_timestamp_micros(a.time_micros)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                .unwrap_or_default();
            let mut line = format!(
                "  {time}  {}  {}",
                a.decision,
                a.target.as_deref().unwrap_or("-")
            );
            if a.version != 0 {
                let _ = write!(line, "  {}", steward_core::model::Lsn(a.version));
            }
            if !a.detail.is_empty() {
                let _ = write!(line, "  {}", a.detail);
            }
            if let Some(user) = &a.user {
                let _ = write!(line, "  by {user}");
            }
            let _ = writeln!(out, "{line}");
        }
        if r.audit.len() > AUDIT_LINES || r.audit_more {
            let _ = writeln!(
                out,
                "  …  steward audit -c {} --entity {} --key {}",
                config.display(),
                s.entity,
                s.key
            );
        }
    }
    out
}

/// The first line: where the record stands.
fn state_line(r: &wire::Record) -> String {
    let s = &r.status;
    if let Some(q) = &s.quarantine {
        if let (Some(RecordState::Blocked), Some(b)) = (s.state, s.blocked_by.first()) {
            return format!(
                "blocked by {} {} ({}) since {}: rule {}: {}",
                b.entity,
                b.key,
                state_name(b.state),
                q.since,
                q.rule,
                q.message
            );
        }
        return format!(
            "quarantined since {} by rule {}: {}",
            q.since, q.rule, q.message
        );
    }
    match s.state {
        Some(RecordState::PendingApproval) => match &s.gate {
            Some(g) => match &g.error {
                Some(e) => format!(
                    "pending approval: gate `{}` cannot be evaluated: {e}",
                    g.expression
                ),
                None => format!("pending approval: gate `{}` is false", g.expression),
            },
            None => "pending approval".to_string(),
        },
        Some(state) => {
            let dead: usize = r.delivery.iter().map(|d| d.dead_letters.len()).sum();
            if dead > 0 {
                format!("{}, dead-lettered at {}", state.as_str(), dead_targets(r))
            } else {
                state.as_str().to_string()
            }
        }
        None if !r.known => "unknown to steward".to_string(),
        None => "no row held by steward".to_string(),
    }
}

fn dead_targets(r: &wire::Record) -> String {
    r.delivery
        .iter()
        .filter(|d| !d.dead_letters.is_empty())
        .map(|d| d.target.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn state_name(state: Option<RecordState>) -> &'static str {
    match state {
        Some(RecordState::PendingApproval) => "pending approval",
        Some(s) => s.as_str(),
        None => "missing",
    }
}

fn decision(d: TargetDecision) -> &'static str {
    match d {
        TargetDecision::Delivered => "delivered",
        TargetDecision::Gated => "withheld by the gate",
        TargetDecision::Quarantined => "withheld (quarantine)",
        TargetDecision::NotRouted => "not routed",
        TargetDecision::Withheld => "withheld until its next evaluation",
        TargetDecision::Undecided => "no decision yet",
    }
}

fn appended(a: &wire::Appended) -> String {
    let state = match a.state {
        DeliveryState::Acknowledged => match (&a.acknowledged_at, &a.acknowledged_before) {
            (Some(at), _) => format!("acknowledged at {at}"),
            (None, Some(before)) => format!("acknowledged before {before}"),
            (None, None) => "acknowledged".to_string(),
        },
        DeliveryState::Pending => "not acknowledged yet".to_string(),
        DeliveryState::DeadLettered => "dead-lettered".to_string(),
        DeliveryState::InWindow => "waiting for the batch window".to_string(),
        DeliveryState::Unknown => "acknowledgement unknown".to_string(),
        DeliveryState::Superseded => "superseded by a reset of the target".to_string(),
    };
    format!(
        "version {} ({} {}, {}), {state}",
        steward_core::model::Lsn(a.version),
        a.decision,
        a.detail,
        a.appended_at
    )
}

fn compact(v: &serde_json::Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 200 {
        let cut: String = s.chars().take(200).collect();
        format!("{cut}…")
    } else {
        s
    }
}
