//! The control API's server: the socket's life (bound before the state
//! file is opened, owner-only or group-shared, removed on exit, a stale one
//! replaced) and the handlers, which reach the running pipeline through
//! channels (see [`RunHandles`]).

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
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
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::wire;
use crate::daemon::govern::{self, Actor, GovCall};
use crate::daemon::snapshot::{self, ResetCall, ResetRequest};
use crate::daemon::{schema, DaemonState};
use steward_core::config::Config;
use steward_core::model::Lsn;
use steward_sinks::requests::{Inbox, Request as DriverRequest, Response as DriverResponse};
use steward_store::audit::AuditFilter;
use steward_store::governance::AuditRecord;
use steward_store::{DlqFilter, Store, TargetStats};

/// How long a request waits for the consume loop, a driver or the
/// snapshot task before it is answered "busy" (503).
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

/// How long closing waits for requests in progress (a backup may take
/// long; it is left to finish on its own thread).
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// What the handlers reach of one daemon run (one per configuration load).
pub struct RunHandles {
    pub config: Config,
    pub store: Store,
    /// To the consume loop, which owns the governance state.
    pub governance: mpsc::Sender<GovCall>,
    /// To the snapshot task.
    pub resets: mpsc::Sender<ResetCall>,
    /// Per target name, its driver's inbox.
    pub inboxes: HashMap<String, Inbox>,
}

struct Shared {
    state: Arc<DaemonState>,
    /// `None` while the daemon starts (before the state file is open) and
    /// between the runs of a reload.
    run: RwLock<Option<Arc<RunHandles>>>,
}

/// The control API's server, from [`Server::bind`] to [`Server::close`].
pub struct Server {
    path: PathBuf,
    /// Device and inode of the socket file bound: only that file is removed on exit.
    file_id: (u64, u64),
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// While alive, the handlers reach the run it was made for.
pub struct Attached<'a> {
    server: &'a Server,
}

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        *self
            .server
            .shared
            .run
            .write()
            .unwrap_or_else(PoisonError::into_inner) = None;
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
        let shared = Arc::new(Shared {
            state,
            run: RwLock::new(None),
        });
        let (stop, mut stopped) = watch::channel(false);
        let app = router(shared.clone());
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
            shared,
            stop,
            task: Mutex::new(Some(task)),
        })
    }

    /// Lets the handlers reach `run` until the returned guard is dropped.
    pub fn attach(&self, run: RunHandles) -> Attached<'_> {
        *self
            .shared
            .run
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(run));
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

fn router(shared: Arc<Shared>) -> Router {
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
        .route(&v("/backup"), post(backup))
        .route(&v("/targets/{target}/reset"), post(reset))
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
        .with_state(shared)
}

/// An error answer: `{"error": {"code", "message"}}` with its status.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    fn internal(e: impl std::fmt::Display) -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("{e:#}"),
        )
    }

    fn busy(what: &str) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            format!(
                "{what} did not answer within {} s; see the daemon's log",
                ANSWER_WITHIN.as_secs()
            ),
        )
    }
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

fn running(shared: &Shared) -> Result<Arc<RunHandles>, ApiError> {
    shared
        .run
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "starting",
                "the daemon is starting (or reloading its configuration) and has not opened the \
                 state file yet; try again in a moment",
            )
        })
}

/// A blocking store call off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(ApiError::internal)?
}

async fn within<T>(what: &str, answer: oneshot::Receiver<T>) -> Result<T, ApiError> {
    match tokio::time::timeout(ANSWER_WITHIN, answer).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(_)) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "stopping",
            format!("{what} stopped before answering (the daemon is stopping or reloading)"),
        )),
        Err(_) => Err(ApiError::busy(what)),
    }
}

fn audit_append(store: &Store, records: &[AuditRecord]) -> Result<(), ApiError> {
    store.audit_append(records).map_err(|e| {
        ApiError::internal(format!(
            "the action was done, but its audit record could not be written: {e}"
        ))
    })
}

fn target_of(run: &RunHandles, target: &str) -> Result<(), ApiError> {
    if run.config.target(target).is_some() {
        return Ok(());
    }
    let names: Vec<&str> = run.config.targets.iter().map(|t| t.name.as_str()).collect();
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_target",
        format!(
            "no target `{target}` in the running configuration; configured targets: {}",
            names.join(", ")
        ),
    ))
}

// ------------------------------------------------------------------ handlers

async fn version() -> Json<wire::Version> {
    Json(wire::Version {
        api: super::API_VERSION.to_string(),
        daemon: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id(),
    })
}

async fn status(State(shared): State<Arc<Shared>>) -> ApiResult<wire::Status> {
    let run = shared
        .run
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let state = shared.state.clone();
    Ok(Json(
        blocking(move || Ok(collect_status(run.as_deref(), &state))).await?,
    ))
}

/// The daemon's status, from its in-memory state and the store.
fn collect_status(run: Option<&RunHandles>, state: &DaemonState) -> wire::Status {
    use std::sync::atomic::Ordering;
    let Some(run) = run else {
        return wire::Status {
            pid: std::process::id(),
            starting: true,
            source_connected: false,
            durable_lsn: None,
            last_source_error: None,
            store_bytes: 0,
            targets: Vec::new(),
            snapshots: Vec::new(),
            stopped_entities: Vec::new(),
        };
    };
    let store = &run.store;
    let targets = run
        .config
        .targets
        .iter()
        .map(|t| match store.target_stats(&t.name) {
            Ok(stats) => wire::TargetStatusLine::new(&t.name, stats),
            Err(e) => wire::TargetStatusLine {
                last_error: Some(format!("cannot read the target's state: {e}")),
                ..wire::TargetStatusLine::new(&t.name, TargetStats::default())
            },
        })
        .collect();
    wire::Status {
        pid: std::process::id(),
        starting: false,
        source_connected: state.connected.load(Ordering::Relaxed),
        durable_lsn: Some(Lsn(state.durable_lsn.load(Ordering::Relaxed)).to_string()),
        last_source_error: state
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone(),
        store_bytes: store.file_size(),
        targets,
        snapshots: snapshot::status_lines(store),
        stopped_entities: schema::stopped(store),
    }
}

async fn snapshots(State(shared): State<Arc<Shared>>) -> ApiResult<wire::Snapshots> {
    let run = running(&shared)?;
    let lines = blocking(move || Ok(snapshot::status_lines(&run.store))).await?;
    Ok(Json(wire::Snapshots { snapshots: lines }))
}

/// Asks the consume loop.
async fn governance(
    run: &RunHandles,
    request: govern::Request,
    actor: Actor,
) -> Result<govern::Response, ApiError> {
    let (reply, answer) = oneshot::channel();
    let call = GovCall {
        request,
        actor,
        reply,
    };
    run.governance.try_send(call).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => ApiError::busy("the governance loop"),
        mpsc::error::TrySendError::Closed(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "stopping",
            "the daemon is stopping or reloading",
        ),
    })?;
    within("the governance loop", answer).await
}

async fn quarantine_list(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    RawQuery(raw): RawQuery,
) -> ApiResult<wire::QuarantineList> {
    let params = query(raw.as_deref(), &["blocked_by"])?;
    let run = running(&shared)?;
    let request = govern::Request::QuarantineList {
        blocked_by: params.get("blocked_by").cloned(),
    };
    let response = governance(&run, request, peer.actor(None).await?).await?;
    if let Some(e) = response.error {
        return Err(ApiError::internal(e));
    }
    Ok(Json(wire::QuarantineList {
        quarantine: response.quarantine,
    }))
}

async fn quarantine_show(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath((entity, key)): UrlPath<(String, String)>,
) -> ApiResult<wire::QuarantineList> {
    let run = running(&shared)?;
    let request = govern::Request::QuarantineShow { entity, key };
    let response = governance(&run, request, peer.actor(None).await?).await?;
    if let Some(e) = response.error {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "not_quarantined", e));
    }
    Ok(Json(wire::QuarantineList {
        quarantine: response.quarantine,
    }))
}

async fn quarantine_release(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath((entity, key)): UrlPath<(String, String)>,
    bytes: Bytes,
) -> ApiResult<wire::Released> {
    let action: wire::Action = body(&bytes)?;
    let run = running(&shared)?;
    let request = govern::Request::QuarantineRelease { entity, key };
    let response = governance(&run, request, peer.actor(action.comment).await?).await?;
    match (response.error, response.message) {
        (None, Some(message)) => Ok(Json(wire::Released {
            message,
            events: response.events,
        })),
        (Some(e), Some(_)) => Err(ApiError::new(StatusCode::CONFLICT, "still_quarantined", e)),
        (Some(e), None) => Err(ApiError::new(StatusCode::NOT_FOUND, "not_quarantined", e)),
        (None, None) => Err(ApiError::internal("the governance loop gave no answer")),
    }
}

async fn audit(
    State(shared): State<Arc<Shared>>,
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
        limit: number(&params, "limit")?,
    };
    let run = running(&shared)?;
    let audit =
        blocking(move || run.store.audit_query(&filter).map_err(ApiError::internal)).await?;
    Ok(Json(wire::AuditList { audit }))
}

async fn backup(
    State(shared): State<Arc<Shared>>,
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
    if !request.dest.is_absolute() {
        return Err(ApiError::bad_request(format!(
            "dest `{}` must be an absolute path (the daemon's working directory is not yours)",
            request.dest.display()
        )));
    }
    if !request.force && std::fs::symlink_metadata(&request.dest).is_ok() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "exists",
            format!(
                "{} exists; give another path, or force (--force) to replace it",
                request.dest.display()
            ),
        ));
    }
    let run = running(&shared)?;
    let actor = peer.actor(request.comment).await?;
    // The copy runs at disk speed on a blocking thread; the pipeline goes on.
    let report = blocking(move || {
        let report = govern::backup(&run.store, &request.dest, request.force).map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "backup_failed",
                format!("{e:#}"),
            )
        })?;
        let detail = format!(
            "backup written to {} ({} bytes, checkpoint {})",
            report.path.display(),
            report.bytes,
            report.checkpoint.as_deref().unwrap_or("none")
        );
        audit_append(
            &run.store,
            &[actor.record("*", "*", None, "backup", detail)],
        )?;
        Ok(report)
    })
    .await?;
    Ok(Json(report))
}

async fn reset(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(target): UrlPath<String>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<wire::ResetStarted>), ApiError> {
    let request: wire::ResetRequest = body(&bytes)?;
    let run = running(&shared)?;
    target_of(&run, &target)?;
    let reset = ResetRequest {
        target: target.clone(),
        entities: request.entities,
        ..ResetRequest::default()
    };
    snapshot::resolve_request(&run.config, &reset)
        .map_err(|e| ApiError::bad_request(format!("{e:#}")))?;
    let (reply, answer) = oneshot::channel();
    run.resets
        .try_send(ResetCall {
            request: reset,
            reply,
        })
        .map_err(|_| ApiError::busy("the snapshot task"))?;
    let entities = match within("the snapshot task", answer).await? {
        Ok(entities) => entities,
        Err(message) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "reset_failed",
                message,
            ))
        }
    };
    let actor = peer.actor(request.comment).await?;
    let records: Vec<AuditRecord> = entities
        .iter()
        .map(|e| {
            actor.record(
                e,
                "*",
                Some(&target),
                "reset",
                "resynchronisation from a fresh snapshot requested".to_string(),
            )
        })
        .collect();
    let store = run.store.clone();
    blocking(move || audit_append(&store, &records)).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(wire::ResetStarted { target, entities }),
    ))
}

/// Hands a request to a target's driver.
async fn driver(
    run: &RunHandles,
    target: &str,
    request: DriverRequest,
) -> Result<DriverResponse, ApiError> {
    let Some(inbox) = run.inboxes.get(target) else {
        return Err(ApiError::internal(format!(
            "target `{target}` has no driver"
        )));
    };
    let answer = inbox.submit(request);
    match within(&format!("the driver of target `{target}`"), answer).await? {
        DriverResponse::Error { message } => Err(ApiError::internal(message)),
        response => Ok(response),
    }
}

async fn flush(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(target): UrlPath<String>,
    bytes: Bytes,
) -> Result<StatusCode, ApiError> {
    let action: wire::Action = body(&bytes)?;
    let run = running(&shared)?;
    target_of(&run, &target)?;
    driver(&run, &target, DriverRequest::Flush).await?;
    let record = peer.actor(action.comment).await?.record(
        "*",
        "*",
        Some(&target),
        "flush",
        "batch windows opened now".to_string(),
    );
    let store = run.store.clone();
    blocking(move || audit_append(&store, &[record])).await?;
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
    State(shared): State<Arc<Shared>>,
    UrlPath(target): UrlPath<String>,
    RawQuery(raw): RawQuery,
) -> ApiResult<wire::DeadLetters> {
    let filter = dlq_filter(&query(raw.as_deref(), &["entity", "key", "id"])?)?;
    let run = running(&shared)?;
    target_of(&run, &target)?;
    let dead_letters = blocking(move || {
        run.store
            .dead_letters(&target, &filter)
            .map_err(ApiError::internal)
    })
    .await?;
    Ok(Json(wire::DeadLetters { dead_letters }))
}

async fn dlq_show(
    State(shared): State<Arc<Shared>>,
    UrlPath((target, id)): UrlPath<(String, String)>,
) -> ApiResult<steward_store::DeadLetter> {
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::bad_request(format!("`{id}` is not a dead letter id")))?;
    let run = running(&shared)?;
    target_of(&run, &target)?;
    let filter = DlqFilter {
        id: Some(id),
        ..DlqFilter::default()
    };
    let name = target.clone();
    let found = blocking(move || {
        run.store
            .dead_letters(&name, &filter)
            .map_err(ApiError::internal)
    })
    .await?;
    found.into_iter().next().map(Json).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "no_dead_letter",
            format!("no dead letter with id {id} in target {target}"),
        )
    })
}

async fn dlq_replay(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(target): UrlPath<String>,
    bytes: Bytes,
) -> ApiResult<wire::Count> {
    let action: wire::DlqAction = body(&bytes)?;
    dlq_change(&shared, &peer, target, action, false).await
}

async fn dlq_drop(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(target): UrlPath<String>,
    bytes: Bytes,
) -> ApiResult<wire::Count> {
    let action: wire::DlqAction = body(&bytes)?;
    if action.filter == DlqFilter::default() && !action.all {
        return Err(ApiError::bad_request(
            "a drop deletes events for good: give a filter (id, key or entity), or all: true to \
             drop every dead letter of the target",
        ));
    }
    dlq_change(&shared, &peer, target, action, true).await
}

/// A replay or a drop, by the target's driver, each dead letter it
/// concerns written to the audit trail in the person's name.
async fn dlq_change(
    shared: &Shared,
    peer: &Peer,
    target: String,
    action: wire::DlqAction,
    drop: bool,
) -> ApiResult<wire::Count> {
    let run = running(shared)?;
    target_of(&run, &target)?;
    let concerned = {
        let (run, target, filter) = (run.clone(), target.clone(), action.filter.clone());
        blocking(move || {
            run.store
                .dead_letters(&target, &filter)
                .map_err(ApiError::internal)
        })
        .await?
    };
    let request = if drop {
        DriverRequest::Drop {
            filter: action.filter,
        }
    } else {
        DriverRequest::Replay {
            filter: action.filter,
        }
    };
    let count = match driver(&run, &target, request).await? {
        DriverResponse::Replayed { count } | DriverResponse::Dropped { count } => count,
        other => return Err(ApiError::internal(format!("unexpected answer {other:?}"))),
    };
    let actor = peer.actor(action.comment).await?;
    let decision = if drop { "dlq_dropped" } else { "dlq_replayed" };
    let records: Vec<AuditRecord> = concerned
        .iter()
        .map(|d| {
            let mut record = actor.record(
                &d.event.entity,
                &d.event.key,
                Some(&target),
                decision,
                format!("dead letter {}: {}", d.id, d.error),
            );
            record.version = d.event.version;
            record
        })
        .collect();
    let store = run.store.clone();
    blocking(move || audit_append(&store, &records)).await?;
    Ok(Json(wire::Count { count }))
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
