//! The control API's server: the socket's life (bound before the state
//! file is opened, owner-only or group-shared, removed on exit, a stale one
//! replaced) and the handlers, which read requests, name the Unix user
//! behind them and leave the work to [`Control`].

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Path as UrlPath, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::IncomingStream;
use axum::{Json, Router};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::service::{blocking, ApiError, Control, RunHandles};
use super::wire;
use crate::daemon::govern::{self, Actor};
use crate::daemon::DaemonState;
use steward_core::config::Config;
use steward_store::audit::AuditFilter;
use steward_store::DlqFilter;

/// How long closing waits for requests in progress (a backup may take
/// long; it is left to finish on its own thread).
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// The control API's server, from [`Server::bind`] to [`Server::close`].
pub struct Server {
    path: PathBuf,
    /// Device and inode of the socket file bound: only that file is removed on exit.
    file_id: (u64, u64),
    control: Control,
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// While alive, the handlers reach the run it was made for.
pub struct Attached<'a> {
    server: &'a Server,
}

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        self.server.control.set_run(None);
    }
}

impl Server {
    /// Creates the socket (`[control] socket`, default `<state path>.sock`)
    /// and serves it. A socket left by a daemon that died (connection
    /// refused) is replaced; one a live daemon serves is not.
    pub fn bind(config: &Config, state: Arc<DaemonState>) -> anyhow::Result<Server> {
        let path = config.control_socket();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                steward_store::files::create_dir_all(dir)
                    .with_context(|| format!("cannot create the directory {}", dir.display()))?;
            }
        }
        clear_stale(&path, config)?;
        let gid = match &config.control.group {
            Some(name) => Some(group_id(name)?),
            None => None,
        };
        // Bound under a temporary name and renamed once its mode and group
        // are right, so that it never exists with looser permissions.
        let mut tmp = path.clone().into_os_string();
        tmp.push(".new");
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let listener = std::os::unix::net::UnixListener::bind(&tmp).map_err(|e| {
            anyhow::anyhow!(
                "cannot create the control socket {}: {e} (a socket path holds at most 107 \
                 bytes; [control] socket may name a shorter one)",
                tmp.display()
            )
        })?;
        let prepared = (|| -> anyhow::Result<()> {
            if let Some(gid) = gid {
                nix::unistd::chown(&tmp, None, Some(gid))
                    .with_context(|| format!("cannot give {} to control.group", tmp.display()))?;
            }
            let mode = if gid.is_some() { 0o660 } else { 0o600 };
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
            std::fs::rename(&tmp, &path)?;
            Ok(())
        })();
        if let Err(e) = prepared {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.context(format!(
                "cannot set up the control socket {}",
                path.display()
            )));
        }
        let meta = std::fs::metadata(&path)?;
        if gid.is_some() {
            warn_if_group_cannot_reach(&path);
        }
        listener.set_nonblocking(true)?;
        let listener = UnixListener::from_std(listener)?;
        let control = Control::new(state);
        let (stop, mut stopped) = watch::channel(false);
        let app = router(control.clone());
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app.into_make_service_with_connect_info::<Peer>())
                .with_graceful_shutdown(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "the control API stopped");
            }
        });
        tracing::info!(socket = %path.display(), "control API listening");
        Ok(Server {
            path,
            file_id: (meta.dev(), meta.ino()),
            control,
            stop,
            task: Mutex::new(Some(task)),
        })
    }

    /// The daemon's operations, for the other front ends (the console).
    pub fn control(&self) -> Control {
        self.control.clone()
    }

    /// Lets the handlers reach `run` until the returned guard is dropped.
    pub fn attach(&self, run: RunHandles) -> Attached<'_> {
        self.control.set_run(Some(run));
        Attached { server: self }
    }

    /// Stops serving and removes the socket (if it is still the one bound).
    pub async fn close(&self) {
        let _ = self.stop.send(true);
        let task = self
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(mut task) = task {
            if tokio::time::timeout(CLOSE_WAIT, &mut task).await.is_err() {
                task.abort();
            }
        }
        self.remove_file();
    }

    fn remove_file(&self) {
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.file_id);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.remove_file();
    }
}

/// Removes a socket file no process listens on any more; refuses to touch
/// a live one or a file that is not a socket.
fn clear_stale(path: &Path, config: &Config) -> anyhow::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(anyhow::anyhow!("cannot check {}: {e}", path.display())),
    };
    if !meta.file_type().is_socket() {
        anyhow::bail!(
            "{} exists and is not a socket: steward serves its control API there; move the \
             file away or set [control] socket to another path",
            path.display()
        );
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => anyhow::bail!(
            "another steward daemon serves the control socket {}: it owns the state file {}; \
             stop it before starting another",
            path.display(),
            config.state.path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
            tracing::info!(socket = %path.display(), "replaced a control socket left by a daemon that did not exit cleanly");
            Ok(())
        }
        Err(e) => Err(anyhow::anyhow!(
            "cannot check the existing control socket {}: {e}",
            path.display()
        )),
    }
}

fn group_id(name: &str) -> anyhow::Result<nix::unistd::Gid> {
    match nix::unistd::Group::from_name(name) {
        Ok(Some(group)) => Ok(group.gid),
        Ok(None) => anyhow::bail!(
            "control.group: there is no group named `{name}` on this system; create it \
             (groupadd {name}) or change the setting"
        ),
        Err(e) => anyhow::bail!("control.group: cannot look up the group `{name}`: {e}"),
    }
}

/// The group's members need to pass through the socket's directory.
fn warn_if_group_cannot_reach(path: &Path) {
    let Some(dir) = path.parent() else {
        return;
    };
    let Ok(meta) = std::fs::metadata(dir) else {
        return;
    };
    if meta.permissions().mode() & 0o011 == 0 {
        tracing::warn!(
            socket = %path.display(),
            directory = %dir.display(),
            "control.group is set but the socket's directory lets only its owner through; \
             members of the group cannot reach the socket: set [control] socket to a path in a \
             directory they may enter (e.g. /run/steward/steward.sock)"
        );
    }
}

/// The connecting process, as the kernel vouches for it (`SO_PEERCRED`).
#[derive(Clone, Debug)]
struct Peer {
    uid: Option<u32>,
}

impl Connected<IncomingStream<'_, UnixListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Self {
        Peer {
            uid: stream.io().peer_cred().ok().map(|c| c.uid()),
        }
    }
}

impl Peer {
    /// The person behind the request. The user name is looked up off the
    /// async threads: the user database may be a directory service.
    async fn actor(&self, comment: Option<String>) -> Result<Actor, ApiError> {
        let uid = self.uid;
        let user =
            blocking(move || Ok(uid.map_or_else(|| "unknown".to_string(), govern::user_name)))
                .await?;
        Ok(Actor {
            user,
            comment: comment.filter(|c| !c.trim().is_empty()),
        })
    }
}

fn router(control: Control) -> Router {
    let v = |path: &str| format!("/{}{path}", super::API_VERSION);
    Router::new()
        .route(&v(""), get(version))
        .route(&v("/status"), get(status))
        .route(&v("/snapshots"), get(snapshots))
        .route(&v("/quarantine"), get(quarantine_list))
        .route(&v("/quarantine/{entity}/{key}"), get(quarantine_show))
        .route(
            &v("/quarantine/{entity}/{key}/release"),
            post(quarantine_release),
        )
        .route(&v("/audit"), get(audit))
        .route(&v("/record/{entity}/{key}"), get(record))
        .route(&v("/backup"), post(backup))
        .route(&v("/targets/{target}/reset"), post(reset))
        .route(&v("/targets/{target}/reconcile"), post(reconcile))
        .route(&v("/targets/{target}/flush"), post(flush))
        .route(&v("/targets/{target}/dead-letters"), get(dlq_list))
        .route(
            &v("/targets/{target}/dead-letters/replay"),
            post(dlq_replay),
        )
        .route(&v("/targets/{target}/dead-letters/drop"), post(dlq_drop))
        .route(&v("/targets/{target}/dead-letters/{id}"), get(dlq_show))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(control)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = wire::ErrorBody {
            error: wire::ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint; see docs/control-api.md",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method; see docs/control-api.md",
    )
}

/// A JSON request body; an empty body is the type's default.
fn body<T: DeserializeOwned + Default>(bytes: &Bytes) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid: {e}")))
}

/// The query string's parameters; a parameter given twice is refused.
fn query(raw: Option<&str>, allowed: &[&str]) -> Result<HashMap<String, String>, ApiError> {
    let mut out = HashMap::new();
    for (k, v) in url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        if !allowed.contains(&k.as_ref()) {
            return Err(ApiError::bad_request(format!(
                "unknown query parameter `{k}`; this endpoint takes: {}",
                allowed.join(", ")
            )));
        }
        if out.insert(k.to_string(), v.to_string()).is_some() {
            return Err(ApiError::bad_request(format!(
                "query parameter `{k}` given twice"
            )));
        }
    }
    Ok(out)
}

fn number<T: std::str::FromStr>(
    params: &HashMap<String, String>,
    name: &str,
) -> Result<Option<T>, ApiError> {
    params
        .get(name)
        .map(|v| {
            v.parse::<T>().map_err(|_| {
                ApiError::bad_request(format!("query parameter `{name}`: `{v}` is not a number"))
            })
        })
        .transpose()
}

// ------------------------------------------------------------------ handlers

async fn version() -> Json<wire::Version> {
    Json(Control::version())
}

async fn status(State(control): State<Control>) -> ApiResult<wire::Status> {
    Ok(Json(control.status().await?))
}

async fn snapshots(State(control): State<Control>) -> ApiResult<wire::Snapshots> {
    Ok(Json(control.snapshots().await?))
}

async fn quarantine_list(
    State(control): State<Control>,
    RawQuery(raw): RawQuery,
) -> ApiResult<wire::QuarantineList> {
    let params = query(raw.as_deref(), &["blocked_by"])?;
    let blocked_by = params.get("blocked_by").cloned();
    Ok(Json(control.quarantine_list(blocked_by).await?))
}

async fn quarantine_show(
    State(control): State<Control>,
    UrlPath((entity, key)): UrlPath<(String, String)>,
) -> ApiResult<wire::QuarantineList> {
    Ok(Json(control.quarantine_show(entity, key).await?))
}

async fn quarantine_release(
    State(control): State<Control>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath((entity, key)): UrlPath<(String, String)>,
    bytes: Bytes,
) -> ApiResult<wire::Released> {
    let action: wire::Action = body(&bytes)?;
    let actor = peer.actor(action.comment).await?;
    Ok(Json(control.release(actor, entity, key).await?))
}

async fn record(
    State(control): State<Control>,
    UrlPath((entity, key)): UrlPath<(String, String)>,
) -> ApiResult<wire::Record> {
    Ok(Json(control.record(entity, key).await?))
}

async fn audit(
    State(control): State<Control>,
    RawQuery(raw): RawQuery,
) -> ApiResult<wire::AuditList> {
    let params = query(
        raw.as_deref(),
        &[
            "entity",
            "key",
            "target",
            "decision",
            "user",
            "since_micros",
            "until_micros",
            "limit",
        ],
    )?;
    let filter = AuditFilter {
        entity: params.get("entity").cloned(),
        key: params.get("key").cloned(),
        target: params.get("target").cloned(),
        decision: params.get("decision").cloned(),
        user: params.get("user").cloned(),
        since_micros: number(&params, "since_micros")?,
        until_micros: number(&params, "until_micros")?,
        limit: number(&params, "limit")?,
    };
    Ok(Json(control.audit(filter).await?))
}

async fn backup(
    State(control): State<Control>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    bytes: Bytes,
) -> ApiResult<steward_store::backup::BackupReport> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "the body must name the destination: {\"dest\": \"/absolute/path\"}",
        ));
    }
    let request: wire::BackupRequest = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid: {e}")))?;
    let actor = peer.actor(request.comment.clone()).await?;
    Ok(Json(control.backup(actor, request).await?))
}

async fn reset(
    State(control): State<Control>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(target): UrlPath<String>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<wire::ResetStarted>), ApiError> {
    let request: wire::ResetRequest = body(&bytes)?;
    let actor = peer.actor(request.comment).await?;
    let started = control.reset(actor, target, request.entities).await?;
    Ok((StatusCode::ACCEPTED, Json(started)))
}

async fn reconcile(
    State(control): State<Control>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(target): UrlPath<String>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<wire::ResetStarted>), ApiError> {
    let request: wire::ReconcileRequest = body(&bytes)?;
    let actor = peer.actor(request.comment).await?;
    let started = control
        .reconcile(
            actor,
            target,
            request.entities,
            request.dry_run,
            request.deep,
        )
        .await?;
    Ok((StatusCode::ACCEPTED, Json(started)))
}

async fn flush(
    State(control): State<Control>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(target): UrlPath<String>,
    bytes: Bytes,
) -> Result<StatusCode, ApiError> {
    let action: wire::Action = body(&bytes)?;
    let actor = peer.actor(action.comment).await?;
    control.flush(actor, target).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn dlq_filter(params: &HashMap<String, String>) -> Result<DlqFilter, ApiError> {
    Ok(DlqFilter {
        entity: params.get("entity").cloned(),
        key: params.get("key").cloned(),
        id: number(params, "id")?,
    })
}

async fn dlq_list(
    State(control): State<Control>,
    UrlPath(target): UrlPath<String>,
    RawQuery(raw): RawQuery,
) -> ApiResult<wire::DeadLetters> {
    let filter = dlq_filter(&query(raw.as_deref(), &["entity", "key", "id"])?)?;
    let dead_letters = control.dead_letters(target, filter).await?;
    Ok(Json(wire::DeadLetters { dead_letters }))
}

async fn dlq_show(
    State(control): State<Control>,
    UrlPath((target, id)): UrlPath<(String, String)>,
) -> ApiResult<steward_store::DeadLetter> {
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::bad_request(format!("`{id}` is not a dead letter id")))?;
    Ok(Json(control.dead_letter(target, id).await?))
}

async fn dlq_replay(
    State(control): State<Control>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(target): UrlPath<String>,
    bytes: Bytes,
) -> ApiResult<wire::Count> {
    let action: wire::DlqAction = body(&bytes)?;
    let actor = peer.actor(action.comment).await?;
    Ok(Json(control.replay(actor, target, action.filter).await?))
}

async fn dlq_drop(
    State(control): State<Control>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(target): UrlPath<String>,
    bytes: Bytes,
) -> ApiResult<wire::Count> {
    let action: wire::DlqAction = body(&bytes)?;
    let actor = peer.actor(action.comment).await?;
    Ok(Json(
        control
            .drop_dead_letters(actor, target, action.filter, action.all)
            .await?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_decoded_and_checked() {
        let q = query(
            Some("entity=product&key=7%7Cx&user=a+b"),
            &["entity", "key", "user"],
        )
        .unwrap();
        assert_eq!(q["entity"], "product");
        assert_eq!(q["key"], "7|x");
        assert_eq!(q["user"], "a b");
        let e = query(Some("entty=product"), &["entity"]).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(
            e.message.contains("unknown query parameter `entty`"),
            "{}",
            e.message
        );
        let e = query(Some("key=1&key=2"), &["key"]).unwrap_err();
        assert!(e.message.contains("given twice"), "{}", e.message);
        assert!(query(None, &[]).unwrap().is_empty());
        let q = query(Some("limit=x"), &["limit"]).unwrap();
        assert!(number::<usize>(&q, "limit").is_err());
    }

    #[test]
    fn bodies_are_optional_but_never_guessed() {
        let empty: wire::Action = body(&Bytes::from_static(b"")).unwrap();
        assert_eq!(empty.comment, None);
        let given: wire::Action =
            body(&Bytes::from_static(br#"{"comment":"ok by finance"}"#)).unwrap();
        assert_eq!(given.comment.as_deref(), Some("ok by finance"));
        let e = body::<wire::Action>(&Bytes::from_static(br#"{"coment":"x"}"#)).unwrap_err();
        assert_eq!((e.status, e.code), (StatusCode::BAD_REQUEST, "bad_request"));
        let e = body::<wire::DlqAction>(&Bytes::from_static(b"{not json")).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let filter: wire::DlqAction = body(&Bytes::from_static(
            br#"{"filter":{"key":"7"},"comment":"fixed"}"#,
        ))
        .unwrap();
        assert_eq!(filter.filter.key.as_deref(), Some("7"));
    }

    #[test]
    fn errors_carry_a_code_and_a_message() {
        let response =
            ApiError::new(StatusCode::CONFLICT, "still_quarantined", "rule x").into_response();
        assert_eq!(response.status(), StatusCode::CONFLICT);
        assert_eq!(
            serde_json::to_value(wire::ErrorBody {
                error: wire::ErrorDetail {
                    code: "c".into(),
                    message: "m".into()
                }
            })
            .unwrap(),
            serde_json::json!({"error": {"code": "c", "message": "m"}})
        );
    }
}
