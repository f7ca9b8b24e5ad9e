//! The console's actions: release a quarantined record, replay or drop
//! dead letters, flush a target's batch windows, reset a target. Each is
//! a confirmation page (GET) with a comment field, then a POST that
//! checks the session's CSRF token and the user's role before
//! [`Control`](crate::daemon::api::Control) does the work and writes the
//! audit record in the user's name, with the comment.

use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;

use super::pages::{self, encode, message_with, record_href, Chrome};
use super::server::{render, App, Who};
use super::session::Sessions;
use super::users::Role;
use crate::daemon::govern::Actor;
use steward_store::DlqFilter;

pub(super) fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/confirm/release/{entity}/{key}", get(confirm_release))
        .route("/confirm/replay/{target}", get(confirm_replay))
        .route("/confirm/drop/{target}", get(confirm_drop))
        .route("/confirm/flush/{target}", get(confirm_flush))
        .route("/confirm/reset/{target}", get(confirm_reset))
        .route("/actions/release", post(release))
        .route("/actions/replay", post(replay))
        .route("/actions/drop", post(drop_dead_letters))
        .route("/actions/flush", post(flush))
        .route("/actions/reset", post(reset))
}

/// The role each action needs.
const RELEASE: Role = Role::Steward;
const DEAD_LETTERS: Role = Role::Operator;
const FLUSH: Role = Role::Operator;
const RESET: Role = Role::Operator;

fn forbidden(who: &Who, needs: Role) -> Response {
    tracing::warn!(user = %who.user, role = %who.role, "console: an action above the user's role was refused");
    pages::message(
        who,
        StatusCode::FORBIDDEN,
        "Not allowed",
        &format!(
            "This needs the {needs} role; you are logged in as {} with the {} role.",
            who.user, who.role
        ),
    )
}

#[derive(Template)]
#[template(path = "confirm.html")]
struct ConfirmPage {
    chrome: Chrome,
    heading: String,
    explanation: String,
    action: &'static str,
    hidden: Vec<(&'static str, String)>,
    button: &'static str,
    danger: bool,
    cancel: String,
}

#[derive(Deserialize)]
struct IdQuery {
    id: Option<u64>,
}

async fn confirm_release(who: Who, Path((entity, key)): Path<(String, String)>) -> Response {
    if !who.may(RELEASE) {
        return forbidden(&who, RELEASE);
    }
    render(&ConfirmPage {
        chrome: Chrome::new(&who, "quarantine"),
        heading: format!("Re-evaluate {entity} {key}"),
        explanation: "steward evaluates the record's current row again against every rule. If \
                      it passes now, it is released and delivered; if not, it stays in \
                      quarantine with the new reason."
            .to_string(),
        action: "/actions/release",
        hidden: vec![("entity", entity.clone()), ("key", key.clone())],
        button: "Re-evaluate and release",
        danger: false,
        cancel: record_href(&entity, &key),
    })
}

fn dlq_confirm(who: &Who, target: String, id: Option<u64>, drop: bool) -> Response {
    if !who.may(DEAD_LETTERS) {
        return forbidden(who, DEAD_LETTERS);
    }
    let which = id.map_or_else(
        || format!("every dead letter of target {target}"),
        |id| format!("dead letter {id} of target {target}"),
    );
    let (heading, explanation, button) = if drop {
        (
            format!("Drop {which}"),
            "Dropped events are deleted for good: the target never receives them. Later \
             events of the same keys are delivered."
                .to_string(),
            "Drop",
        )
    } else {
        (
            format!("Replay {which}"),
            "The events are delivered again, in order, before later events of the same keys."
                .to_string(),
            "Replay",
        )
    };
    let mut hidden = vec![("target", target.clone())];
    if let Some(id) = id {
        hidden.push(("id", id.to_string()));
    }
    render(&ConfirmPage {
        chrome: Chrome::new(who, "dead-letters"),
        heading,
        explanation,
        action: if drop {
            "/actions/drop"
        } else {
            "/actions/replay"
        },
        hidden,
        button,
        danger: drop,
        cancel: format!("/dead-letters?target={}", encode(&target)),
    })
}

async fn confirm_replay(
    who: Who,
    Path(target): Path<String>,
    Query(q): Query<IdQuery>,
) -> Response {
    dlq_confirm(&who, target, q.id, false)
}

async fn confirm_drop(who: Who, Path(target): Path<String>, Query(q): Query<IdQuery>) -> Response {
    dlq_confirm(&who, target, q.id, true)
}

async fn confirm_flush(who: Who, Path(target): Path<String>) -> Response {
    if !who.may(FLUSH) {
        return forbidden(&who, FLUSH);
    }
    render(&ConfirmPage {
        chrome: Chrome::new(&who, "overview"),
        heading: format!("Flush target {target}"),
        explanation: "Opens the target's batch windows now: events waiting for a delivery \
                      window are sent at once."
            .to_string(),
        action: "/actions/flush",
        hidden: vec![("target", target)],
        button: "Flush now",
        danger: false,
        cancel: "/".to_string(),
    })
}

async fn confirm_reset(who: Who, Path(target): Path<String>) -> Response {
    if !who.may(RESET) {
        return forbidden(&who, RESET);
    }
    render(&ConfirmPage {
        chrome: Chrome::new(&who, "overview"),
        heading: format!("Reset target {target}"),
        explanation: "Resynchronises the target from a fresh snapshot of every entity it \
                      takes: it receives every current record again (deletes included for \
                      records it has that no longer exist)."
            .to_string(),
        action: "/actions/reset",
        hidden: vec![("target", target)],
        button: "Reset the target",
        danger: true,
        cancel: "/".to_string(),
    })
}

/// Every action's form: the CSRF token and the comment, plus its own fields.
#[derive(Deserialize)]
struct ActionForm {
    csrf: Option<String>,
    #[serde(default)]
    comment: String,
    #[serde(default)]
    entity: String,
    #[serde(default)]
    key: String,
    #[serde(default)]
    target: String,
    id: Option<String>,
}

/// The checks every POST passes, in order: the CSRF token, the role, a
/// comment. Returns the actor to record.
fn checked(who: &Who, form: &ActionForm, needs: Role) -> Result<Actor, Box<Response>> {
    if !Sessions::check_csrf(&who.session, form.csrf.as_deref()) {
        return Err(Box::new(pages::csrf_refused(who)));
    }
    if !who.may(needs) {
        return Err(Box::new(forbidden(who, needs)));
    }
    let comment = form.comment.trim();
    if comment.is_empty() {
        return Err(Box::new(pages::message(
            who,
            StatusCode::BAD_REQUEST,
            "A comment is needed",
            "Say why in the comment field: it is written to the audit trail with your name.",
        )));
    }
    Ok(Actor {
        user: who.user.clone(),
        comment: Some(comment.to_string()),
    })
}

fn done(who: &Who, heading: &str, message: &str, back: (String, String)) -> Response {
    message_with(who, StatusCode::OK, heading, message, Some(back))
}

fn refused(
    who: &Who,
    heading: &str,
    e: &crate::daemon::api::ApiError,
    back: (String, String),
) -> Response {
    message_with(who, e.status, heading, &e.message, Some(back))
}

async fn release(State(app): State<Arc<App>>, who: Who, Form(form): Form<ActionForm>) -> Response {
    let actor = match checked(&who, &form, RELEASE) {
        Ok(a) => a,
        Err(r) => return *r,
    };
    let back = (
        record_href(&form.entity, &form.key),
        format!("Back to {} {}", form.entity, form.key),
    );
    match app
        .control
        .release(actor, form.entity.clone(), form.key.clone())
        .await
    {
        Ok(r) => done(&who, "Released", &r.message, back),
        Err(e) => refused(&who, "Not released", &e, back),
    }
}

fn dlq_filter(form: &ActionForm) -> Result<DlqFilter, String> {
    let id = match form.id.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        None => None,
        Some(id) => Some(
            id.parse::<u64>()
                .map_err(|_| format!("`{id}` is not a dead letter id"))?,
        ),
    };
    Ok(DlqFilter {
        id,
        ..DlqFilter::default()
    })
}

async fn dlq_action(app: &App, who: &Who, form: ActionForm, drop: bool) -> Response {
    let actor = match checked(who, &form, DEAD_LETTERS) {
        Ok(a) => a,
        Err(r) => return *r,
    };
    let back = (
        format!("/dead-letters?target={}", encode(&form.target)),
        format!("Back to the dead letters of {}", form.target),
    );
    let filter = match dlq_filter(&form) {
        Ok(f) => f,
        Err(e) => return message_with(who, StatusCode::BAD_REQUEST, "Refused", &e, Some(back)),
    };
    let all = filter == DlqFilter::default();
    let result = if drop {
        app.control
            .drop_dead_letters(actor, form.target.clone(), filter, all)
            .await
    } else {
        app.control.replay(actor, form.target.clone(), filter).await
    };
    let verb = if drop { "Dropped" } else { "Replayed" };
    match result {
        Ok(c) => done(
            who,
            verb,
            &format!(
                "{verb} {} dead letter(s) of target {}.",
                c.count, form.target
            ),
            back,
        ),
        Err(e) => refused(who, &format!("Not {}", verb.to_lowercase()), &e, back),
    }
}

async fn replay(State(app): State<Arc<App>>, who: Who, Form(form): Form<ActionForm>) -> Response {
    dlq_action(&app, &who, form, false).await
}

async fn drop_dead_letters(
    State(app): State<Arc<App>>,
    who: Who,
    Form(form): Form<ActionForm>,
) -> Response {
    dlq_action(&app, &who, form, true).await
}

async fn flush(State(app): State<Arc<App>>, who: Who, Form(form): Form<ActionForm>) -> Response {
    let actor = match checked(&who, &form, FLUSH) {
        Ok(a) => a,
        Err(r) => return *r,
    };
    let back = ("/".to_string(), "Back to the overview".to_string());
    match app.control.flush(actor, form.target.clone()).await {
        Ok(()) => done(
            &who,
            "Flushed",
            &format!("The batch windows of target {} are open now.", form.target),
            back,
        ),
        Err(e) => refused(&who, "Not flushed", &e, back),
    }
}

async fn reset(State(app): State<Arc<App>>, who: Who, Form(form): Form<ActionForm>) -> Response {
    let actor = match checked(&who, &form, RESET) {
        Ok(a) => a,
        Err(r) => return *r,
    };
    let back = ("/".to_string(), "Back to the overview".to_string());
    match app
        .control
        .reset(actor, form.target.clone(), Vec::new())
        .await
    {
        Ok(r) => done(
            &who,
            "Reset started",
            &format!(
                "Target {} is being resynchronised from a fresh snapshot of: {}.",
                r.target,
                r.entities.join(", ")
            ),
            back,
        ),
        Err(e) => refused(&who, "Not reset", &e, back),
    }
}
