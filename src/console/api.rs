//! Read-only JSON for tools on the console's listener: `GET /api/v1/...`
//! with `Authorization: Bearer stw_...` (an API token from `steward token
//! add`). The answers are the control API's; a token sees what a viewer
//! sees (no source rows, no withheld documents). Nothing here changes
//! anything: any other method is refused.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::header::{self, HeaderMap};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use serde_json::Value;

use super::server::App;
use crate::daemon::api::wire::{ErrorBody, ErrorDetail};
use crate::daemon::api::ApiError;

pub(super) fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/api/v1/status", get(status).fallback(read_only))
        .route("/api/v1/quarantine", get(quarantine).fallback(read_only))
        .route(
            "/api/v1/records/{entity}/{key}",
            get(record).fallback(read_only),
        )
        .route("/api/{*rest}", any(no_endpoint))
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(ErrorBody {
            error: ErrorDetail {
                code: code.to_string(),
                message: message.into(),
            },
        }),
    )
        .into_response()
}

fn api_error(e: ApiError) -> Response {
    error(e.status, e.code, e.message)
}

/// The token's name, when the request carries a valid one.
fn token(app: &App, headers: &HeaderMap) -> Result<String, Box<Response>> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(given) = given else {
        return Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "give an API token: Authorization: Bearer stw_... (steward token add NAME)",
        )));
    };
    app.users
        .current()
        .verify_token(given)
        .map(str::to_string)
        .ok_or_else(|| {
            Box::new(error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "unknown or revoked API token",
            ))
        })
}

async fn read_only() -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "read_only",
        "API tokens only read: this endpoint answers GET; actions are taken in the console or \
         with the command line",
    )
}

async fn no_endpoint() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint; the console serves GET /api/v1/status, /api/v1/quarantine and \
         /api/v1/records/{entity}/{key}",
    )
}

async fn status(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(r) = token(&app, &headers) {
        return *r;
    }
    match app.control.status().await {
        Ok(s) => Json(s).into_response(),
        Err(e) => api_error(e),
    }
}

/// Removes what only stewards and operators see: the withheld document.
fn without_documents(mut entry: Value) -> Value {
    if let Some(map) = entry.as_object_mut() {
        map.remove("document");
    }
    entry
}

async fn quarantine(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(r) = token(&app, &headers) {
        return *r;
    }
    match app.control.quarantine_list(None).await {
        Ok(list) => {
            let entries: Vec<Value> = list
                .quarantine
                .iter()
                .filter_map(|q| serde_json::to_value(q).ok())
                .map(without_documents)
                .collect();
            Json(serde_json::json!({ "quarantine": entries })).into_response()
        }
        Err(e) => api_error(e),
    }
}

async fn record(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path((entity, key)): Path<(String, String)>,
) -> Response {
    if let Err(r) = token(&app, &headers) {
        return *r;
    }
    match app.control.record(entity, key).await {
        Ok(record) => {
            let mut value = serde_json::to_value(&record).unwrap_or(Value::Null);
            if let Some(map) = value.as_object_mut() {
                map.remove("row");
                map.remove("source");
                if let Some(q) = map.remove("quarantine") {
                    map.insert("quarantine".to_string(), without_documents(q));
                }
            }
            Json(value).into_response()
        }
        Err(e) => api_error(e),
    }
}
