//! Recording HTTP receiver: the target used by `steward demo`, the tests and
//! the benchmarks.
//!
//! It accepts POSTs of CloudEvents JSON batches on any path, records them and
//! answers according to a switchable [`Behaviour`], so tests can make a
//! target fail, hang, or vanish ([`Receiver::stop`]) and come back
//! ([`Receiver::restart`]) on the same port.
//!
//! A batch is accepted only if it is a JSON array of objects that carry the
//! CloudEvents required attributes and steward's `version` extension as a
//! decimal string; anything else is answered 400, so a malformed body from the
//! sink shows up as a failed delivery rather than passing silently.
//!
//! [`Receiver::start_tls`] serves HTTPS instead (see `dev::tls`), optionally
//! requiring a client certificate; [`Receiver::set_latency`] makes every
//! answer wait (a distant target) and [`Receiver::max_concurrent_requests`]
//! tells how many requests were in progress at once;
//! [`Receiver::accept_any_json`] accepts any JSON array of objects (e.g.
//! Debezium envelopes) instead of checking CloudEvents.
//!
//! Memory: [`Receiver::start`] keeps every body and parsed event (for tests);
//! [`Receiver::start_counting`] keeps only the count and one small
//! [`AcceptedEvent`] per event (for benchmarks).

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Largest accepted request body; benchmarks send big batches.
const MAX_BODY_BYTES: usize = 256 * 1024 * 1024;

/// How the receiver answers the next requests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Behaviour {
    /// 204 No Content for every valid batch.
    #[default]
    Ok,
    /// This status for every request.
    Fail(u16),
    /// This status with a `Retry-After` header holding `retry_after` verbatim.
    FailWithRetryAfter {
        /// HTTP status, e.g. 429 or 503.
        status: u16,
        /// The header value, e.g. `2` (seconds) or an HTTP date.
        retry_after: String,
    },
    /// This status for the next `times` requests, then [`Behaviour::Ok`].
    FailTimes {
        /// HTTP status.
        status: u16,
        /// How many requests fail.
        times: usize,
    },
    /// Never answer (until [`Receiver::stop`]), to trigger client timeouts.
    Hang,
    /// Answer like [`Behaviour::Ok`] after this delay: a slow target.
    Slow(Duration),
    /// This status for every batch holding an event whose `subject` (key) is
    /// `key`, [`Behaviour::Ok`] for the others: a target refusing one record.
    FailKey {
        /// The refused key.
        key: String,
        /// HTTP status.
        status: u16,
    },
}

/// One request as it arrived.
#[derive(Clone, Debug)]
pub struct ReceivedRequest {
    /// Arrival time.
    pub at: Instant,
    /// Arrival time on the wall clock, to compare with timestamps made
    /// elsewhere (a commit time): the wall clock may be slewed against the
    /// monotonic one (by 0.5% on a build machine), so `at` cannot be turned
    /// into wall time through one anchor.
    pub wall: SystemTime,
    /// Header names (lower case) and values, in arrival order.
    pub headers: Vec<(String, String)>,
    /// Empty for a receiver started with [`Receiver::start_counting`].
    pub body: Bytes,
    /// What we answered; 0 while a [`Behaviour::Hang`] request is unanswered.
    pub status: u16,
}

/// One accepted event, as kept even in counting mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcceptedEvent {
    /// The CloudEvent `id`.
    pub id: String,
    pub(crate) version: u64,
    /// When the request holding it arrived.
    pub at: Instant,
}

type Hook = Arc<dyn Fn(&serde_json::Value) + Send + Sync>;

/// State shared by the handle and the server tasks.
struct Shared {
    counting: bool,
    behaviour: Mutex<Behaviour>,
    requests: Mutex<Vec<ReceivedRequest>>,
    accepted: Mutex<Vec<serde_json::Value>>,
    log: Mutex<Vec<AcceptedEvent>>,
    /// Mirrors `count_tx` for lock-free reads; written only inside `send_modify`.
    count: AtomicUsize,
    count_tx: watch::Sender<usize>,
    /// Bumped by `stop`: open connections and hanging requests end on a change.
    stop_gen: watch::Sender<u64>,
    hook: RwLock<Option<Hook>>,
    /// Connections currently open, so `stop` can wait until all are closed.
    open_connections: Arc<AtomicUsize>,
    /// HTTPS: the handshake for every connection.
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// TLS handshakes that failed (client refused our certificate, or sent none).
    tls_failures: Arc<Mutex<Vec<String>>>,
    /// Added before every answer.
    latency: Mutex<Duration>,
    /// Accept any JSON array of objects instead of checking CloudEvents.
    any_json: AtomicBool,
    /// Requests in progress now, and the most at once.
    active: AtomicUsize,
    max_active: AtomicUsize,
}

/// Certificate and key (PEM) for [`Receiver::start_tls`]; with `client_ca`,
/// a client must present a certificate signed by it.
#[derive(Clone, Debug)]
pub struct ReceiverTls {
    /// Server certificate chain, PEM.
    pub cert: PathBuf,
    /// Its private key, PEM.
    pub key: PathBuf,
    /// CA certificate that client certificates must be signed by, PEM.
    pub client_ca: Option<PathBuf>,
}

/// Owned by the `Receiver` clones only (not by the server), so dropping the
/// last clone stops the server.
struct Handle {
    shared: Arc<Shared>,
    port: u16,
    server: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.stop_gen.send_modify(|g| *g += 1);
        if let Some(task) = lock(&self.server).take() {
            task.abort();
        }
    }
}

/// A running (or stopped) receiver. Clones share it.
#[derive(Clone)]
pub struct Receiver {
    handle: Arc<Handle>,
}

impl fmt::Debug for Receiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receiver")
            .field("port", &self.handle.port)
            .field("running", &lock(&self.handle.server).is_some())
            .field("counting", &self.handle.shared.counting)
            .field("accepted", &self.accepted_count())
            .finish()
    }
}

/// Poisoning only means another test thread panicked; the data is still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Receiver {
    /// Binds 127.0.0.1 on a free port, recording full bodies and events.
    pub async fn start() -> io::Result<Receiver> {
        Self::launch(0, false).await
    }

    /// Binds 127.0.0.1 on a free port, keeping only counts and [`AcceptedEvent`]s.
    pub async fn start_counting() -> io::Result<Receiver> {
        Self::launch(0, true).await
    }

    /// Binds 127.0.0.1 on a free port and serves HTTPS, recording full bodies and events.
    pub async fn start_tls(tls: ReceiverTls) -> io::Result<Receiver> {
        let config = super::tls::server_config(&tls.cert, &tls.key, tls.client_ca.as_deref())?;
        Self::launch_with(0, false, Some(Arc::new(config).into())).await
    }

    async fn launch(port: u16, counting: bool) -> io::Result<Receiver> {
        Self::launch_with(port, counting, None).await
    }

    async fn launch_with(
        port: u16,
        counting: bool,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> io::Result<Receiver> {
        let listener = bind(port).await?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared {
            counting,
            behaviour: Mutex::new(Behaviour::Ok),
            requests: Mutex::new(Vec::new()),
            accepted: Mutex::new(Vec::new()),
            log: Mutex::new(Vec::new()),
            count: AtomicUsize::new(0),
            count_tx: watch::Sender::new(0),
            stop_gen: watch::Sender::new(0),
            hook: RwLock::new(None),
            open_connections: Arc::new(AtomicUsize::new(0)),
            tls,
            tls_failures: Arc::new(Mutex::new(Vec::new())),
            latency: Mutex::new(Duration::ZERO),
            any_json: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            max_active: AtomicUsize::new(0),
        });
        let task = serve(Arc::clone(&shared), listener);
        Ok(Receiver {
            handle: Arc::new(Handle {
                shared,
                port,
                server: Mutex::new(Some(task)),
            }),
        })
    }

    /// `http://127.0.0.1:PORT/events` (`https://` when started with TLS)
    pub fn url(&self) -> String {
        let scheme = if self.handle.shared.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}/events", self.handle.port)
    }

    /// Every answer waits this long first (not a [`Behaviour::Hang`]).
    pub fn set_latency(&self, latency: Duration) {
        *lock(&self.handle.shared.latency) = latency;
    }

    /// With `true`, any JSON array of objects is accepted and recorded (ids
    /// in [`Receiver::accepted_log`] are then empty).
    pub fn accept_any_json(&self, any: bool) {
        self.handle.shared.any_json.store(any, Ordering::Release);
    }

    /// The most requests that were in progress at the same time.
    pub fn max_concurrent_requests(&self) -> usize {
        self.handle.shared.max_active.load(Ordering::Acquire)
    }

    /// Why TLS handshakes failed, in order (empty for plain HTTP).
    pub fn tls_failures(&self) -> Vec<String> {
        lock(&self.handle.shared.tls_failures).clone()
    }

    /// The port listened on (kept across [`Receiver::restart`]).
    pub fn port(&self) -> u16 {
        self.handle.port
    }

    /// Applies from the next request on; resets a `FailTimes` countdown.
    pub fn set_behaviour(&self, b: Behaviour) {
        *lock(&self.handle.shared.behaviour) = b;
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<ReceivedRequest> {
        lock(&self.handle.shared.requests).clone()
    }

    /// All CloudEvents accepted (answered 2xx) so far, in arrival order.
    /// Always empty in counting mode: use [`Receiver::accepted_log`].
    pub fn accepted_events(&self) -> Vec<serde_json::Value> {
        lock(&self.handle.shared.accepted).clone()
    }

    /// Id and arrival time of every accepted event, in arrival order.
    pub fn accepted_log(&self) -> Vec<AcceptedEvent> {
        lock(&self.handle.shared.log).clone()
    }

    /// Events accepted so far (also in counting mode).
    pub fn accepted_count(&self) -> usize {
        self.handle.shared.count.load(Ordering::Acquire)
    }

    /// Waits until at least `n` events were accepted or `timeout` passes; returns the count.
    pub async fn wait_for_events(&self, n: usize, timeout: Duration) -> usize {
        let mut rx = self.handle.shared.count_tx.subscribe();
        // The sender lives as long as `self`, so `wait_for` only ends by the predicate.
        let _ = tokio::time::timeout(timeout, rx.wait_for(|c| *c >= n)).await;
        self.accepted_count()
    }

    /// Forgets every record and resets the count to 0.
    #[cfg(test)]
    fn clear(&self) {
        let shared = &self.handle.shared;
        lock(&shared.requests).clear();
        lock(&shared.accepted).clear();
        lock(&shared.log).clear();
        shared.count_tx.send_modify(|c| {
            *c = 0;
            shared.count.store(0, Ordering::Release);
        });
    }

    /// Stops listening: new connections are refused, kept-alive connections
    /// are closed and hanging requests are dropped — a dead target.
    pub async fn stop(&self) {
        let task = lock(&self.handle.server).take();
        self.handle.shared.stop_gen.send_modify(|g| *g += 1);
        if let Some(task) = task {
            task.abort();
            // Wait for the listener to be dropped, so the port is closed on return.
            let _ = task.await;
        }
        // Killed connections close when their tasks next run; bounded so a
        // stuck task cannot hang a test.
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.handle.shared.open_connections.load(Ordering::Acquire) > 0
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Listens again on the same port; a no-op while running.
    pub async fn restart(&self) -> io::Result<()> {
        if lock(&self.handle.server).is_some() {
            return Ok(());
        }
        let listener = bind(self.handle.port).await?;
        let task = serve(Arc::clone(&self.handle.shared), listener);
        let mut server = lock(&self.handle.server);
        if let Some(other) = server.replace(task) {
            // A concurrent restart won the race: keep one server.
            if let Some(mine) = server.replace(other) {
                mine.abort();
            }
        }
        Ok(())
    }

    /// Calls `f` with each accepted event, after it was recorded (the demo
    /// prints them). In counting mode, setting a hook makes every batch be
    /// parsed in full again.
    pub fn on_event(&self, f: impl Fn(&serde_json::Value) + Send + Sync + 'static) {
        *self
            .handle
            .shared
            .hook
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(f));
    }
}

async fn bind(port: u16) -> io::Result<TcpListener> {
    TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await
}

fn serve(shared: Arc<Shared>, listener: TcpListener) -> JoinHandle<()> {
    let listener = KillableListener {
        inner: listener,
        stop: shared.stop_gen.subscribe(),
        open: Arc::clone(&shared.open_connections),
        tls: shared.tls.clone(),
        tls_failures: Arc::clone(&shared.tls_failures),
    };
    let app = Router::new()
        .fallback(handle)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(shared);
    tokio::spawn(async move {
        // Serving a custom listener only ends when the task is aborted.
        let _ = axum::serve(listener, app).await;
    })
}

/// What the behaviour says about one request.
enum Answer {
    Accept(Option<Duration>),
    Fail(u16, Option<String>),
    FailKey(String, u16),
    Hang,
}

impl Shared {
    fn decide(&self) -> Answer {
        let mut b = lock(&self.behaviour);
        match &mut *b {
            Behaviour::Ok => Answer::Accept(None),
            Behaviour::Slow(d) => Answer::Accept(Some(*d)),
            Behaviour::Fail(status) => Answer::Fail(*status, None),
            Behaviour::FailWithRetryAfter {
                status,
                retry_after,
            } => Answer::Fail(*status, Some(retry_after.clone())),
            Behaviour::Hang => Answer::Hang,
            Behaviour::FailKey { key, status } => Answer::FailKey(key.clone(), *status),
            Behaviour::FailTimes { status, times } => {
                if *times == 0 {
                    *b = Behaviour::Ok;
                    Answer::Accept(None)
                } else {
                    *times -= 1;
                    let status = *status;
                    if *times == 0 {
                        *b = Behaviour::Ok;
                    }
                    Answer::Fail(status, None)
                }
            }
        }
    }

    fn record(
        &self,
        (at, wall): (Instant, SystemTime),
        headers: &HeaderMap,
        body: &Bytes,
        status: u16,
    ) -> usize {
        let headers = headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = if self.counting {
            Bytes::new()
        } else {
            body.clone()
        };
        let mut requests = lock(&self.requests);
        requests.push(ReceivedRequest {
            at,
            wall,
            headers,
            body,
            status,
        });
        requests.len() - 1
    }

    fn set_status(&self, index: usize, status: u16) {
        if let Some(r) = lock(&self.requests).get_mut(index) {
            r.status = status;
        }
    }
}

/// The attributes the receiver checks in each event.
#[derive(Deserialize)]
struct Required<'a> {
    #[serde(borrow)]
    specversion: Cow<'a, str>,
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    #[allow(dead_code)] // required to be present, not used
    source: Cow<'a, str>,
    #[serde(borrow, rename = "type")]
    #[allow(dead_code)]
    ty: Cow<'a, str>,
    #[serde(borrow)]
    version: Cow<'a, str>,
}

impl Required<'_> {
    fn check(self, at: Instant) -> Result<AcceptedEvent, String> {
        if self.specversion != "1.0" {
            return Err(format!(
                "event {}: specversion {:?}, expected \"1.0\"",
                self.id, self.specversion
            ));
        }
        let version = self.version.parse::<u64>().map_err(|_| {
            format!(
                "event {}: version {:?} is not a decimal u64 string",
                self.id, self.version
            )
        })?;
        Ok(AcceptedEvent {
            id: self.id.into_owned(),
            version,
            at,
        })
    }
}

/// Parses and checks a batch; full events are returned when `full`.
fn parse_batch(
    body: &[u8],
    at: Instant,
    full: bool,
) -> Result<(Vec<AcceptedEvent>, Vec<serde_json::Value>), String> {
    if full {
        let events: Vec<serde_json::Value> =
            serde_json::from_slice(body).map_err(|e| format!("not a JSON array of events: {e}"))?;
        let mut log = Vec::with_capacity(events.len());
        for (i, ev) in events.iter().enumerate() {
            let req = Required::deserialize(ev).map_err(|e| format!("event #{i}: {e}"))?;
            log.push(req.check(at)?);
        }
        Ok((log, events))
    } else {
        let events: Vec<Required<'_>> = serde_json::from_slice(body)
            .map_err(|e| format!("not a JSON array of CloudEvents: {e}"))?;
        let log = events
            .into_iter()
            .map(|r| r.check(at))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((log, Vec::new()))
    }
}

/// Counts a request as in progress until dropped.
struct Active<'a>(&'a AtomicUsize);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Any JSON array of objects (see [`Receiver::accept_any_json`]).
fn parse_any(
    body: &[u8],
    at: Instant,
) -> Result<(Vec<AcceptedEvent>, Vec<serde_json::Value>), String> {
    let events: Vec<serde_json::Map<String, serde_json::Value>> =
        serde_json::from_slice(body).map_err(|e| format!("not a JSON array of objects: {e}"))?;
    let log = events
        .iter()
        .map(|_| AcceptedEvent {
            id: String::new(),
            version: 0,
            at,
        })
        .collect();
    Ok((
        log,
        events.into_iter().map(serde_json::Value::Object).collect(),
    ))
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let at = Instant::now();
    let wall = SystemTime::now();
    let now = shared.active.fetch_add(1, Ordering::AcqRel) + 1;
    shared.max_active.fetch_max(now, Ordering::AcqRel);
    let _active = Active(&shared.active);
    let latency = *lock(&shared.latency);
    if method != Method::POST {
        shared.record((at, wall), &headers, &body, 405);
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            "steward receiver: only POST is accepted\n",
        )
            .into_response();
    }
    let mut answer = shared.decide();
    if let Answer::FailKey(key, status) = &answer {
        let holds_key = serde_json::from_slice::<Vec<serde_json::Value>>(&body)
            .map(|events| events.iter().any(|e| e["subject"] == key.as_str()))
            .unwrap_or(false);
        answer = if holds_key {
            Answer::Fail(*status, None)
        } else {
            Answer::Accept(None)
        };
    }
    if !latency.is_zero() && !matches!(answer, Answer::Hang) {
        tokio::time::sleep(latency).await;
    }
    match answer {
        // Resolved above into Fail or Accept.
        Answer::FailKey(..) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        Answer::Hang => {
            let index = shared.record((at, wall), &headers, &body, 0);
            let mut stop = shared.stop_gen.subscribe();
            let _ = stop.changed().await;
            // The connection is being killed; this answer is unlikely to reach anyone.
            shared.set_status(index, 503);
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
        Answer::Fail(status, retry_after) => {
            let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            shared.record((at, wall), &headers, &body, code.as_u16());
            let mut response = (
                code,
                format!(
                    "steward receiver: configured to fail with {}\n",
                    code.as_u16()
                ),
            )
                .into_response();
            if let Some(v) = retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
                response
                    .headers_mut()
                    .insert(axum::http::header::RETRY_AFTER, v);
            }
            response
        }
        Answer::Accept(delay) => {
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            let hook = shared
                .hook
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let full = !shared.counting || hook.is_some();
            let parsed = if shared.any_json.load(Ordering::Acquire) {
                parse_any(&body, at)
            } else {
                parse_batch(&body, at, full)
            };
            let (log, events) = match parsed {
                Ok(parsed) => parsed,
                Err(problem) => {
                    shared.record((at, wall), &headers, &body, 400);
                    return (
                        StatusCode::BAD_REQUEST,
                        format!("steward receiver: {problem}\n"),
                    )
                        .into_response();
                }
            };
            shared.record((at, wall), &headers, &body, 204);
            let n = log.len();
            lock(&shared.log).extend(log);
            if let Some(hook) = &hook {
                for ev in &events {
                    hook(ev);
                }
            }
            if !shared.counting {
                lock(&shared.accepted).extend(events);
            }
            // Counted before answering: once the sender sees 2xx, the count includes the batch.
            shared.count_tx.send_modify(|c| {
                *c += n;
                shared.count.store(*c, Ordering::Release);
            });
            StatusCode::NO_CONTENT.into_response()
        }
    }
}

/// A TCP listener whose connections all fail once the receiver is stopped.
struct KillableListener {
    inner: TcpListener,
    stop: watch::Receiver<u64>,
    open: Arc<AtomicUsize>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    tls_failures: Arc<Mutex<Vec<String>>>,
}

/// Longest TLS handshake the receiver waits for (handshakes run one at a time).
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

impl axum::serve::Listener for KillableListener {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    self.open.fetch_add(1, Ordering::AcqRel);
                    let guard = OpenGuard(Arc::clone(&self.open));
                    let plain = KillableStream::new(stream, self.stop.clone(), guard);
                    let Some(tls) = &self.tls else {
                        return (Conn::Plain(plain), addr);
                    };
                    let failure = match tokio::time::timeout(
                        TLS_HANDSHAKE_TIMEOUT,
                        tls.accept(plain),
                    )
                    .await
                    {
                        Ok(Ok(stream)) => return (Conn::Tls(Box::new(stream)), addr),
                        Ok(Err(e)) => e.to_string(),
                        Err(_) => "handshake timed out".to_string(),
                    };
                    lock(&self.tls_failures).push(failure);
                }
                // Out of file descriptors and the like: wait instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection, plain or TLS.
enum Conn {
    Plain(KillableStream),
    Tls(Box<tokio_rustls::server::TlsStream<KillableStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// A connection that fails every read and write once `stop` changes, so that
/// kept-alive client connections die with the receiver like with a real
/// crashed server (dropping the listener alone would leave them served).
struct KillableStream {
    io: TcpStream,
    _open: OpenGuard,
    stopped: Pin<Box<dyn Future<Output = ()> + Send>>,
    dead: bool,
}

impl KillableStream {
    fn new(io: TcpStream, mut stop: watch::Receiver<u64>, open: OpenGuard) -> Self {
        let stopped = Box::pin(async move {
            let _ = stop.changed().await;
        });
        KillableStream {
            io,
            _open: open,
            stopped,
            dead: false,
        }
    }

    fn killed(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.dead && self.stopped.as_mut().poll(cx).is_ready() {
            self.dead = true;
        }
        self.dead
    }
}

/// Counts a connection as open until the stream is dropped.
struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn stopped_error() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "receiver stopped")
}

impl AsyncRead for KillableStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.killed(cx) {
            return Poll::Ready(Err(stopped_error()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.killed(cx) {
            return Poll::Ready(Err(stopped_error()));
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.killed(cx) {
            return Poll::Ready(Err(stopped_error()));
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.killed(cx) {
            return Poll::Ready(Err(stopped_error()));
        }
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal HTTP/1.1 client so these tests do not depend on the sink.
    async fn post(port: u16, body: &str) -> io::Result<(u16, String)> {
        steward_postgres::install_default_provider();
        let client = reqwest::Client::new();
        let resp = client
            .post(format!("http://127.0.0.1:{port}/anything"))
            .header("content-type", "application/cloudevents-batch+json")
            .body(body.to_string())
            .send()
            .await
            .map_err(io::Error::other)?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(io::Error::other)?;
        Ok((status, text))
    }

    fn batch(ids: &[&str]) -> String {
        let events: Vec<String> = ids
            .iter()
            .map(|id| {
                format!(
                    r#"{{"specversion":"1.0","id":"{id}","source":"steward://s","type":"steward.p.upsert","version":"42","data":{{"n":1.10}}}}"#
                )
            })
            .collect();
        format!("[{}]", events.join(","))
    }

    #[tokio::test]
    async fn records_and_accepts_batches() {
        let r = Receiver::start().await.expect("starts");
        let seen = Arc::new(AtomicUsize::new(0));
        let seen2 = Arc::clone(&seen);
        r.on_event(move |_| {
            seen2.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(
            post(r.port(), &batch(&["a", "b"])).await.expect("post").0,
            204
        );
        assert_eq!(r.accepted_count(), 2);
        assert_eq!(seen.load(Ordering::Relaxed), 2);
        let events = r.accepted_events();
        assert_eq!(events[1]["id"], "b");
        assert_eq!(
            events[0]["data"]["n"].to_string(),
            "1.10",
            "numbers kept exactly"
        );
        let log = r.accepted_log();
        assert_eq!((log[0].id.as_str(), log[0].version), ("a", 42));
        assert_eq!(r.requests()[0].body.len(), batch(&["a", "b"]).len());

        let (status, text) = post(r.port(), r#"[{"id":"x"}]"#).await.expect("post");
        assert_eq!(status, 400);
        assert!(text.contains("specversion"), "{text}");
        assert_eq!(post(r.port(), "{}").await.expect("post").0, 400);
        assert_eq!(r.accepted_count(), 2);
        r.clear();
        assert_eq!((r.accepted_count(), r.requests().len()), (0, 0));
    }

    #[tokio::test]
    async fn behaviours_switch() {
        let r = Receiver::start().await.expect("starts");
        r.set_behaviour(Behaviour::FailTimes {
            status: 503,
            times: 2,
        });
        assert_eq!(post(r.port(), &batch(&["a"])).await.expect("post").0, 503);
        assert_eq!(post(r.port(), &batch(&["a"])).await.expect("post").0, 503);
        assert_eq!(post(r.port(), &batch(&["a"])).await.expect("post").0, 204);
        r.set_behaviour(Behaviour::Fail(1000));
        assert_eq!(
            post(r.port(), &batch(&["a"])).await.expect("post").0,
            500,
            "invalid status → 500"
        );
        let statuses: Vec<u16> = r.requests().iter().map(|q| q.status).collect();
        assert_eq!(statuses, [503, 503, 204, 500]);
        assert_eq!(r.accepted_count(), 1);
    }

    #[tokio::test]
    async fn counting_mode_keeps_no_bodies() {
        let r = Receiver::start_counting().await.expect("starts");
        let waiter = {
            let r = r.clone();
            tokio::spawn(async move { r.wait_for_events(3, Duration::from_secs(5)).await })
        };
        assert_eq!(
            post(r.port(), &batch(&["a", "b"])).await.expect("post").0,
            204
        );
        assert_eq!(post(r.port(), &batch(&["c"])).await.expect("post").0, 204);
        assert_eq!(waiter.await.expect("joins"), 3);
        assert!(r.accepted_events().is_empty());
        assert!(r.requests().iter().all(|q| q.body.is_empty()));
        let ids: Vec<String> = r.accepted_log().into_iter().map(|e| e.id).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(
            r.wait_for_events(10, Duration::from_millis(50)).await,
            3,
            "times out with the count"
        );
    }

    #[tokio::test]
    async fn stop_refuses_and_restart_serves_again() {
        let r = Receiver::start().await.expect("starts");
        let port = r.port();
        assert_eq!(post(port, &batch(&["a"])).await.expect("post").0, 204);
        r.stop().await;
        assert!(
            TcpStream::connect(("127.0.0.1", port)).await.is_err(),
            "refused while stopped"
        );
        r.restart().await.expect("restarts");
        r.restart().await.expect("second restart is a no-op");
        assert_eq!(post(port, &batch(&["b"])).await.expect("post").0, 204);
        assert_eq!(r.accepted_count(), 2);
    }

    #[tokio::test]
    async fn stop_ends_hanging_requests_and_drop_stops_the_server() {
        let r = Receiver::start().await.expect("starts");
        let port = r.port();
        r.set_behaviour(Behaviour::Hang);
        let pending = tokio::spawn(post(port, "[]"));
        // Wait for the request to arrive before stopping.
        for _ in 0..200 {
            if !r.requests().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(r.requests()[0].status, 0);
        r.stop().await;
        let outcome = tokio::time::timeout(Duration::from_secs(5), pending)
            .await
            .expect("ends")
            .expect("joins");
        assert!(
            outcome.is_err(),
            "the hanging request fails instead of being answered: {outcome:?}"
        );

        r.restart().await.expect("restarts");
        drop(r);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            TcpStream::connect(("127.0.0.1", port)).await.is_err(),
            "dropped receiver stops listening"
        );
    }
}
