//! The console's read-only pages: overview, quarantine, pending approvals,
//! dead letters, the record view and the audit search. Every page reads
//! through [`Control`](crate::daemon::api::Control), as the control API
//! does; none needs JavaScript.
//!
//! What a role sees: everyone sees each target's document (after that
//! target's field policy: masked, hashed or left-out fields stay so).
//! The source row and a quarantined record's withheld document hold every
//! column, before any target's policy (a bank account a target masks, say):
//! only stewards and operators, who act on them, see those.

use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use serde_json::Value;

use super::server::{render, App, Who};
use super::users::Role;
use crate::daemon::api::ApiError;
use steward_core::config::Config;
use steward_core::pipeline::govern::{RecordState, TargetDecision};
use steward_store::audit::AuditFilter;
use steward_store::governance::{AuditRecord, QuarantineEntry};
use steward_store::{DeadLetter, DlqFilter};

pub(super) fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/", get(overview))
        .route("/quarantine", get(quarantine))
        .route("/approvals", get(approvals))
        .route("/dead-letters", get(dead_letters))
        .route("/records", get(find_record))
        .route("/records/{entity}/{key}", get(record))
        .route("/audit", get(audit))
}

/// What every page's frame shows: who is logged in, what they may do,
/// which page this is.
pub(super) struct Chrome {
    pub(super) user: String,
    pub(super) role: &'static str,
    pub(super) csrf: String,
    pub(super) page: &'static str,
    /// May act on quarantine and approvals.
    pub(super) steward: bool,
    /// May act on dead letters, windows and resets.
    pub(super) operator: bool,
    /// The page reloads itself (progressive enhancement).
    pub(super) refresh: bool,
}

impl Chrome {
    pub(super) fn new(who: &Who, page: &'static str) -> Chrome {
        Chrome {
            user: who.user.clone(),
            role: who.role.name(),
            csrf: who.session.csrf.clone(),
            page,
            steward: who.may(Role::Steward),
            operator: who.may(Role::Operator),
            refresh: false,
        }
    }
}

/// A path segment, percent-encoded (keys may hold `|`, `/`, spaces).
pub(super) fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The record page's address.
pub(super) fn record_href(entity: &str, key: &str) -> String {
    format!("/records/{}/{}", encode(entity), encode(key))
}

/// `entity key` (a quarantine entry's `blocked_by`) as a label and a link.
fn blocker_link(blocked_by: Option<&str>) -> Option<(String, String)> {
    let (entity, key) = blocked_by?.split_once(' ')?;
    Some((format!("{entity} {key}"), record_href(entity, key)))
}

#[derive(Template)]
#[template(path = "message.html")]
struct MessagePage {
    chrome: Chrome,
    heading: String,
    message: String,
    class: &'static str,
    back: Option<(String, String)>,
}

/// A page that says one thing, with `status`.
pub(super) fn message(who: &Who, status: StatusCode, heading: &str, message: &str) -> Response {
    message_with(who, status, heading, message, None)
}

pub(super) fn message_with(
    who: &Who,
    status: StatusCode,
    heading: &str,
    message: &str,
    back: Option<(String, String)>,
) -> Response {
    let class = if status.is_success() { "done" } else { "error" };
    let mut response = render(&MessagePage {
        chrome: Chrome::new(who, ""),
        heading: heading.to_string(),
        message: message.to_string(),
        class,
        back,
    });
    *response.status_mut() = status;
    response
}

/// The answer to a state-changing request without the session's CSRF token.
pub(super) fn csrf_refused(who: &Who) -> Response {
    tracing::warn!(user = %who.user, "console: a request without a valid CSRF token was refused");
    message(
        who,
        StatusCode::FORBIDDEN,
        "Refused",
        "The form did not carry this session's security token (it may come from another site, \
         or the page is older than your session). Nothing was changed; reload the page and try \
         again.",
    )
}

/// The daemon could not answer.
pub(super) fn failed(who: &Who, e: &ApiError) -> Response {
    message(who, e.status, "Cannot show this", &e.message)
}

fn config_of(app: &App) -> Option<Config> {
    app.control.config()
}

/// The entities a person names: those configured, not the child tables
/// and external ids steward tracks for them.
fn entity_names(config: Option<&Config>) -> Vec<String> {
    config.map_or_else(Vec::new, |c| {
        c.entities
            .iter()
            .zip(&c.governance.entities)
            .filter(|(_, g)| !g.is_hidden())
            .map(|(e, _)| e.name.clone())
            .collect()
    })
}

fn target_names(config: Option<&Config>) -> Vec<String> {
    config.map_or_else(Vec::new, |c| {
        c.targets.iter().map(|t| t.name.clone()).collect()
    })
}

fn nonempty(v: Option<String>) -> Option<String> {
    v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

// ------------------------------------------------------------ overview

struct TargetRow {
    name: String,
    health: String,
    health_class: &'static str,
    backlog: u64,
    lag: String,
    last_delivered: String,
    dead_letters: u64,
    last_error: Option<String>,
}

struct EntityRow {
    entity: String,
    published: u64,
    pending_approval: u64,
    quarantined: u64,
    blocked: u64,
    dead_lettered: u64,
}

#[derive(Template)]
#[template(path = "overview.html")]
struct OverviewPage {
    chrome: Chrome,
    problem: Option<String>,
    source_connected: bool,
    source_error: Option<String>,
    durable_lsn: String,
    held_back: Vec<String>,
    targets: Vec<TargetRow>,
    entities: Vec<EntityRow>,
}

async fn overview(State(app): State<Arc<App>>, who: Who) -> Response {
    let status = match app.control.status().await {
        Ok(s) => s,
        Err(e) => return failed(&who, &e),
    };
    let mut problem = None;
    if status.starting {
        problem = Some(
            "The daemon is starting (or reloading its configuration): figures appear once it \
             has opened its state file."
                .to_string(),
        );
    }
    let overview = match app.control.overview().await {
        Ok(o) => Some(o),
        Err(e) => {
            problem.get_or_insert(e.message);
            None
        }
    };
    let lag_of = |name: &str| {
        overview
            .as_ref()
            .and_then(|o| o.lag.iter().find(|l| l.target == name))
            .and_then(|l| l.oldest_undelivered_seconds)
    };
    let stall_budget = config_of(&app).map(|c| c.metrics.ready_max_target_stall.as_secs());
    let targets = status
        .targets
        .iter()
        .map(|t| {
            let lag = lag_of(&t.name);
            let stalled = matches!((lag, stall_budget), (Some(l), Some(b)) if l > b);
            let (health, class) = if t.last_error.is_some() {
                ("failing", "bad")
            } else if stalled {
                ("stalled", "bad")
            } else if t.dead_letters > 0 {
                ("delivering, with dead letters", "warn")
            } else if t.backlog > 0 {
                ("delivering", "")
            } else {
                ("up to date", "good")
            };
            TargetRow {
                name: t.name.clone(),
                health: health.to_string(),
                health_class: class,
                backlog: t.backlog,
                lag: lag.map_or_else(|| "none".to_string(), duration_words),
                last_delivered: t
                    .last_delivered_at
                    .clone()
                    .unwrap_or_else(|| "never".to_string()),
                dead_letters: t.dead_letters,
                last_error: t.last_error.clone(),
            }
        })
        .collect();
    let (entities, held_back) = match overview {
        Some(o) => (
            o.entities
                .into_iter()
                .map(|e| EntityRow {
                    entity: e.records.entity,
                    published: e.records.published,
                    pending_approval: e.records.pending_approval,
                    quarantined: e.records.quarantined,
                    blocked: e.records.blocked,
                    dead_lettered: e.dead_lettered,
                })
                .collect(),
            o.held_back.into_iter().map(|h| h.text).collect(),
        ),
        None => (Vec::new(), Vec::new()),
    };
    let mut chrome = Chrome::new(&who, "overview");
    chrome.refresh = true;
    render(&OverviewPage {
        chrome,
        problem,
        source_connected: status.source_connected,
        source_error: status.last_source_error,
        durable_lsn: status.durable_lsn.unwrap_or_else(|| "none yet".to_string()),
        held_back,
        targets,
        entities,
    })
}

/// `42 s`, `5 min`, `3 h 20 min`, `2 d 4 h`.
fn duration_words(seconds: u64) -> String {
    match seconds {
        s if s < 120 => format!("{s} s"),
        s if s < 3600 => format!("{} min", s / 60),
        s if s < 86_400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        s => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

// ------------------------------------------------------------ quarantine

#[derive(Debug, Default, Deserialize)]
struct QuarantineFilter {
    entity: Option<String>,
    rule: Option<String>,
    state: Option<String>,
    /// Held for at least: `1h`, `1d`, `7d`.
    age: Option<String>,
}

struct QuarantineRow {
    entity: String,
    key: String,
    href: String,
    rule: String,
    message: String,
    since: String,
    blocked_by: Option<(String, String)>,
}

#[derive(Template)]
#[template(path = "quarantine.html")]
struct QuarantinePage {
    chrome: Chrome,
    filter: QuarantineFilter,
    entities: Vec<String>,
    rules: Vec<String>,
    ages: Vec<(String, String)>,
    rows: Vec<QuarantineRow>,
}

fn age_limit(age: Option<&str>) -> Option<chrono::Duration> {
    match age? {
        "1h" => Some(chrono::Duration::hours(1)),
        "1d" => Some(chrono::Duration::days(1)),
        "7d" => Some(chrono::Duration::days(7)),
        "30d" => Some(chrono::Duration::days(30)),
        _ => None,
    }
}

fn held_long_enough(entry: &QuarantineEntry, age: Option<chrono::Duration>) -> bool {
    let Some(age) = age else { return true };
    chrono::DateTime::parse_from_rfc3339(&entry.since)
        .is_ok_and(|since| chrono::Utc::now().signed_duration_since(since) >= age)
}

async fn quarantine(
    State(app): State<Arc<App>>,
    who: Who,
    Query(mut filter): Query<QuarantineFilter>,
) -> Response {
    filter.entity = nonempty(filter.entity.take());
    filter.rule = nonempty(filter.rule.take());
    filter.state = nonempty(filter.state.take());
    filter.age = nonempty(filter.age.take());
    let list = match app.control.quarantine_list(None).await {
        Ok(l) => l.quarantine,
        Err(e) => return failed(&who, &e),
    };
    let mut rules: Vec<String> = list.iter().map(|q| q.rule.clone()).collect();
    rules.sort();
    rules.dedup();
    let age = age_limit(filter.age.as_deref());
    let rows = list
        .iter()
        .filter(|q| filter.entity.as_deref().is_none_or(|e| q.entity == e))
        .filter(|q| filter.rule.as_deref().is_none_or(|r| q.rule == r))
        .filter(|q| match filter.state.as_deref() {
            Some("blocked") => q.blocked_by.is_some(),
            Some("quarantined") => q.blocked_by.is_none(),
            _ => true,
        })
        .filter(|q| held_long_enough(q, age))
        .map(|q| QuarantineRow {
            entity: q.entity.clone(),
            key: q.key.clone(),
            href: record_href(&q.entity, &q.key),
            rule: q.rule.clone(),
            message: q.message.clone(),
            since: q.since.clone(),
            blocked_by: blocker_link(q.blocked_by.as_deref()),
        })
        .collect();
    let ages = [
        ("", "any time"),
        ("1h", "an hour"),
        ("1d", "a day"),
        ("7d", "a week"),
        ("30d", "30 days"),
    ]
    .iter()
    .map(|(v, l)| ((*v).to_string(), (*l).to_string()))
    .collect();
    let mut chrome = Chrome::new(&who, "quarantine");
    chrome.refresh = true;
    render(&QuarantinePage {
        chrome,
        entities: entity_names(config_of(&app).as_ref()),
        filter,
        rules,
        ages,
        rows,
    })
}

// ------------------------------------------------------------ approvals

#[derive(Deserialize)]
struct EntityQuery {
    entity: Option<String>,
}

#[derive(Template)]
#[template(path = "approvals.html")]
struct ApprovalsPage {
    chrome: Chrome,
    entities: Vec<String>,
    entity: Option<String>,
    rows: Vec<(String, String, String, String)>,
    truncated: bool,
}

/// At most this many records per entity are listed.
const LIST_LIMIT: usize = 500;

async fn approvals(
    State(app): State<Arc<App>>,
    who: Who,
    Query(q): Query<EntityQuery>,
) -> Response {
    let entity = nonempty(q.entity);
    let config = config_of(&app);
    let gated: Vec<(String, String)> = config
        .as_ref()
        .map(|c| {
            c.entities
                .iter()
                .zip(&c.governance.entities)
                .filter_map(|(e, g)| Some((e.name.clone(), g.publish_when()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    let mut rows = Vec::new();
    let mut truncated = false;
    for (name, gate) in &gated {
        if entity.as_deref().is_some_and(|e| e != name) {
            continue;
        }
        match app
            .control
            .records_in_state(name.clone(), RecordState::PendingApproval, LIST_LIMIT)
            .await
        {
            Ok((keys, total)) => {
                truncated |= total > keys.len() as u64;
                rows.extend(
                    keys.into_iter()
                        .map(|k| (name.clone(), k.clone(), record_href(name, &k), gate.clone())),
                );
            }
            Err(e) => return failed(&who, &e),
        }
    }
    let mut chrome = Chrome::new(&who, "approvals");
    chrome.refresh = true;
    render(&ApprovalsPage {
        chrome,
        entities: gated.into_iter().map(|(e, _)| e).collect(),
        entity,
        rows,
        truncated,
    })
}

// ------------------------------------------------------------ dead letters

#[derive(Deserialize)]
struct DlqQuery {
    target: Option<String>,
    entity: Option<String>,
}

struct DlqRow {
    id: u64,
    entity: String,
    key: String,
    href: String,
    error: String,
    attempts: u32,
    first_failure: String,
    last_failure: String,
}

struct DlqTarget {
    name: String,
    rows: Vec<DlqRow>,
}

#[derive(Template)]
#[template(path = "dead_letters.html")]
struct DeadLettersPage {
    chrome: Chrome,
    target_names: Vec<String>,
    entities: Vec<String>,
    target: Option<String>,
    entity: Option<String>,
    targets: Vec<DlqTarget>,
}

fn dlq_row(d: &DeadLetter) -> DlqRow {
    DlqRow {
        id: d.id,
        entity: d.event.entity.clone(),
        key: d.event.key.clone(),
        href: record_href(&d.event.entity, &d.event.key),
        error: d.error.clone(),
        attempts: d.attempts,
        first_failure: d.first_failure.clone(),
        last_failure: d.last_failure.clone(),
    }
}

async fn dead_letters(
    State(app): State<Arc<App>>,
    who: Who,
    Query(q): Query<DlqQuery>,
) -> Response {
    let (target, entity) = (nonempty(q.target), nonempty(q.entity));
    let config = config_of(&app);
    let names = target_names(config.as_ref());
    let mut targets = Vec::new();
    for name in names
        .iter()
        .filter(|n| target.as_deref().is_none_or(|t| t == n.as_str()))
    {
        let filter = DlqFilter {
            entity: entity.clone(),
            ..DlqFilter::default()
        };
        match app.control.dead_letters(name.clone(), filter).await {
            Ok(list) => targets.push(DlqTarget {
                name: name.clone(),
                rows: list.iter().take(LIST_LIMIT).map(dlq_row).collect(),
            }),
            Err(e) => return failed(&who, &e),
        }
    }
    let mut chrome = Chrome::new(&who, "dead-letters");
    chrome.refresh = true;
    render(&DeadLettersPage {
        chrome,
        target_names: names,
        entities: entity_names(config.as_ref()),
        target,
        entity,
        targets,
    })
}

// ------------------------------------------------------------ record

#[derive(Template)]
#[template(path = "records.html")]
struct FindPage {
    chrome: Chrome,
    entities: Vec<String>,
}

#[derive(Deserialize)]
struct FindQuery {
    entity: Option<String>,
    key: Option<String>,
}

async fn find_record(
    State(app): State<Arc<App>>,
    who: Who,
    Query(q): Query<FindQuery>,
) -> Response {
    if let (Some(entity), Some(key)) = (nonempty(q.entity), nonempty(q.key)) {
        return Redirect::to(&record_href(&entity, &key)).into_response();
    }
    render(&FindPage {
        chrome: Chrome::new(&who, "records"),
        entities: entity_names(config_of(&app).as_ref()),
    })
}

struct Link {
    label: String,
    href: String,
    note: String,
}

struct QuarantineView {
    rule: String,
    message: String,
    since: String,
    version: u64,
    blocked_by: Option<(String, String)>,
    /// `None` for roles that may not see it.
    document: Option<String>,
}

struct TargetView {
    target: String,
    decision: &'static str,
    up_to_date: Option<&'static str>,
    /// The last version appended and what became of it.
    appended: Option<String>,
    /// The last version the target acknowledged, and when.
    acknowledged: Option<String>,
    document: Option<String>,
    /// For a quarantined record: field by field, withheld against delivered.
    diff: Vec<(String, String, String)>,
    diff_note: Option<String>,
}

fn appended_words(a: &crate::daemon::api::wire::Appended) -> String {
    use crate::daemon::api::wire::DeliveryState as D;
    let state = match a.state {
        D::Acknowledged => "acknowledged",
        D::Pending => "waiting in the outbox",
        D::DeadLettered => "dead-lettered",
        D::InWindow => "waiting for the batch window",
        D::Unknown => "state not known",
        D::Superseded => "superseded by a reset",
    };
    format!(
        "version {} ({}, {}), {state}",
        a.version, a.decision, a.appended_at
    )
}

fn acknowledged_words(a: &crate::daemon::api::wire::Appended) -> String {
    match (&a.acknowledged_at, &a.acknowledged_before) {
        (Some(at), _) => format!("version {} at {at}", a.version),
        (None, Some(before)) => format!("version {} before {before}", a.version),
        (None, None) => format!("version {}", a.version),
    }
}

pub(super) struct AuditRow {
    time: String,
    entity: String,
    key: String,
    href: String,
    target: String,
    decision: String,
    detail: String,
    user: String,
    comment: String,
}

pub(super) fn audit_row(a: &AuditRecord) -> AuditRow {
    let time = chrono::DateTime::from_timestamp_micros(a.time_micros)
        .map_or_else(String::new, |t| t.format("%Y-%m-%d %H:%M:%S").to_string());
    AuditRow {
        time,
        entity: a.entity.clone(),
        key: a.key.clone(),
        href: record_href(&a.entity, &a.key),
        target: a.target.clone().unwrap_or_default(),
        decision: a.decision.clone(),
        detail: a.detail.clone(),
        user: a.user.clone().unwrap_or_default(),
        comment: a.comment.clone().unwrap_or_default(),
    }
}

#[derive(Template)]
#[template(path = "record.html")]
struct RecordPage {
    chrome: Chrome,
    entity: String,
    key: String,
    problem: Option<String>,
    state: String,
    state_class: &'static str,
    gate: Option<steward_core::pipeline::govern::Gate>,
    quarantine: Option<QuarantineView>,
    blocked_by: Vec<Link>,
    blocks: Vec<Link>,
    dependents: Vec<Link>,
    dependents_more: usize,
    targets: Vec<TargetView>,
    dead_letters: Vec<(String, DlqRowView)>,
    row: Option<String>,
    audit: Vec<AuditRow>,
}

/// A dead letter as the record page lists it.
struct DlqRowView {
    id: u64,
    error: String,
    last_failure: String,
}

fn state_words(state: Option<RecordState>) -> (&'static str, &'static str) {
    match state {
        Some(RecordState::Published) => ("published", "good"),
        Some(RecordState::PendingApproval) => ("pending approval", "warn"),
        Some(RecordState::Quarantined) => ("quarantined", "bad"),
        Some(RecordState::Blocked) => ("blocked (waits for another record)", "warn"),
        None => ("no row held (deleted, never seen, or not tracked)", "muted"),
    }
}

fn decision_words(d: TargetDecision) -> &'static str {
    match d {
        TargetDecision::Delivered => "delivered",
        TargetDecision::Gated => "withheld: pending approval",
        TargetDecision::Quarantined => "withheld: quarantined",
        TargetDecision::NotRouted => "not routed to this target",
        TargetDecision::Withheld => "withheld; goes out with its next evaluation",
        TargetDecision::Undecided => "no decision yet",
    }
}

/// What a record's withheld document is, from its quarantine entry.
fn withheld_document(entry: &QuarantineEntry) -> Option<Value> {
    serde_json::to_value(entry)
        .ok()?
        .get("document")
        .cloned()
        .filter(|d| !d.is_null())
}

async fn record(
    State(app): State<Arc<App>>,
    who: Who,
    Path((entity, key)): Path<(String, String)>,
) -> Response {
    let record = match app.control.record(entity.clone(), key.clone()).await {
        Ok(r) => r,
        Err(e) => return failed(&who, &e),
    };
    let sees_all = who.may(Role::Steward);
    let problem = record.note.clone();
    let audit: Vec<AuditRow> = record.audit.iter().map(audit_row).collect();
    let mut dead = Vec::new();
    for d in &record.delivery {
        dead.extend(d.dead_letters.iter().map(|l| {
            (
                d.target.clone(),
                DlqRowView {
                    id: l.id,
                    error: l.error.clone(),
                    last_failure: l.last_failure.clone(),
                },
            )
        }));
    }
    let status = &record.status;
    let (state, state_class) = state_words(status.state);
    let quarantine = status.quarantine.as_ref().map(|q| QuarantineView {
        rule: q.rule.clone(),
        message: q.message.clone(),
        since: q.since.clone(),
        version: q.version,
        blocked_by: blocker_link(q.blocked_by.as_deref()),
        document: if sees_all {
            withheld_document(q).map(|d| pretty(&d))
        } else {
            None
        },
    });
    let related = |list: &[steward_core::pipeline::govern::RelatedRecord], what: &str| {
        list.iter()
            .map(|r| Link {
                label: format!("{} {}", r.entity, r.key),
                href: record_href(&r.entity, &r.key),
                note: format!("{} {}; {}", what, r.via, state_words(r.state).0),
            })
            .collect::<Vec<_>>()
    };
    let page = RecordPage {
        chrome: Chrome::new(&who, "records"),
        problem,
        state: state.to_string(),
        state_class,
        gate: status.gate.clone(),
        quarantine,
        blocked_by: status
            .blocked_by
            .iter()
            .map(|b| Link {
                label: format!("{} {}", b.entity, b.key),
                href: record_href(&b.entity, &b.key),
                note: format!("rule {}: {}", b.rule, b.reason),
            })
            .collect(),
        blocks: related(&status.blocks, "waits by rule"),
        dependents: related(&status.dependents, "uses it through"),
        dependents_more: status
            .dependents_total
            .saturating_sub(status.dependents.len()),
        targets: status
            .targets
            .iter()
            .map(|t| {
                let delivery = record.delivery.iter().find(|d| d.target == t.target);
                let mut diff = Vec::new();
                if let Some(d) = &t.diff {
                    for (field, v) in &d.added {
                        diff.push((field.clone(), "(none)".to_string(), v.to_string()));
                    }
                    for (field, v) in &d.removed {
                        diff.push((field.clone(), v.to_string(), "(none)".to_string()));
                    }
                    for (field, c) in &d.changed {
                        diff.push((
                            field.clone(),
                            c.delivered.to_string(),
                            c.withheld.to_string(),
                        ));
                    }
                    diff.sort();
                }
                TargetView {
                    target: t.target.clone(),
                    decision: decision_words(t.decision),
                    up_to_date: t.up_to_date.map(|u| {
                        if u {
                            "yes"
                        } else {
                            "no: the target has an earlier version"
                        }
                    }),
                    appended: delivery
                        .and_then(|d| d.last_appended.as_ref())
                        .map(appended_words),
                    acknowledged: delivery
                        .and_then(|d| d.last_acknowledged.as_ref())
                        .map(acknowledged_words),
                    document: t.document.as_ref().map(pretty),
                    diff,
                    diff_note: t.diff_note.clone(),
                }
            })
            .collect(),
        dead_letters: dead,
        row: if sees_all {
            record
                .source
                .row
                .as_ref()
                .or(status.row.as_ref())
                .map(pretty)
        } else {
            None
        },
        audit,
        entity,
        key,
    };
    render(&page)
}

// ------------------------------------------------------------ audit

#[derive(Debug, Default, Deserialize)]
struct AuditQuery {
    #[serde(default)]
    entity: String,
    #[serde(default)]
    key: String,
    #[serde(default)]
    target: String,
    #[serde(default)]
    decision: String,
    #[serde(default)]
    user: String,
    #[serde(default)]
    since: String,
    #[serde(default)]
    until: String,
}

#[derive(Template)]
#[template(path = "audit.html")]
struct AuditPage {
    chrome: Chrome,
    filter: AuditQuery,
    decisions: &'static [&'static str],
    problem: Option<String>,
    limit: usize,
    audit: Vec<AuditRow>,
}

/// The audit search shows at most this many records.
const AUDIT_LIMIT: usize = 500;

const DECISIONS: &[&str] = &[
    "delivered",
    "gated",
    "unpublished",
    "quarantined",
    "released",
    "release_refused",
    "suppressed",
    "redacted",
    "not_routed",
    "unrepairable",
    "dlq_replayed",
    "dlq_dropped",
    "flush",
    "reset",
    "backup",
];

/// `2026-12-03`, `2026-12-03T14:00`, `2026-12-03 14:00[:ss]` or RFC 3339,
/// UTC, as µs since the epoch.
pub(super) fn parse_time(text: &str) -> Option<i64> {
    let text = text.trim();
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Some(t.timestamp_micros());
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Some(d.and_hms_opt(0, 0, 0)?.and_utc().timestamp_micros());
    }
    for format in [
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%d %H:%M:%S",
    ] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(text, format) {
            return Some(t.and_utc().timestamp_micros());
        }
    }
    None
}

async fn audit(State(app): State<Arc<App>>, who: Who, Query(q): Query<AuditQuery>) -> Response {
    let some = |s: &str| nonempty(Some(s.to_string()));
    let mut problem = None;
    let mut time = |text: &str| match some(text) {
        None => None,
        Some(text) => match parse_time(&text) {
            Some(t) => Some(t),
            None => {
                problem = Some(format!(
                    "`{text}` is not a time: write 2026-12-03 or 2026-12-03T14:00 (UTC)"
                ));
                None
            }
        },
    };
    let since_micros = time(&q.since);
    let until_micros = time(&q.until);
    let filter = AuditFilter {
        entity: some(&q.entity),
        key: some(&q.key),
        target: some(&q.target),
        decision: some(&q.decision),
        user: some(&q.user),
        since_micros,
        until_micros,
        limit: Some(AUDIT_LIMIT),
    };
    let audit = if problem.is_some() {
        Vec::new()
    } else {
        match app.control.audit(filter).await {
            Ok(a) => a.audit.iter().rev().map(audit_row).collect(),
            Err(e) => {
                problem = Some(e.message);
                Vec::new()
            }
        }
    };
    render(&AuditPage {
        chrome: Chrome::new(&who, "audit"),
        filter: q,
        decisions: DECISIONS,
        problem,
        limit: AUDIT_LIMIT,
        audit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_encoded_for_a_path() {
        assert_eq!(encode("42"), "42");
        assert_eq!(encode("7|x y/z"), "7%7Cx%20y%2Fz");
        assert_eq!(record_href("product", "a&b"), "/records/product/a%26b");
        assert_eq!(
            blocker_link(Some("product 42")),
            Some(("product 42".into(), "/records/product/42".into()))
        );
        assert_eq!(blocker_link(None), None);
    }

    #[test]
    fn lags_read_as_people_say_them() {
        assert_eq!(duration_words(42), "42 s");
        assert_eq!(duration_words(300), "5 min");
        assert_eq!(duration_words(12_000), "3 h 20 min");
        assert_eq!(duration_words(187_200), "2 d 4 h");
    }

    #[test]
    fn audit_times_are_read_in_the_usual_forms() {
        let day = parse_time("2026-12-03").unwrap();
        assert_eq!(parse_time("2026-12-03T00:00").unwrap(), day);
        assert_eq!(parse_time("2026-12-03 01:00").unwrap(), day + 3_600_000_000);
        assert_eq!(parse_time("2026-12-03T00:00:00Z").unwrap(), day);
        assert_eq!(parse_time("yesterday"), None);
    }
}
