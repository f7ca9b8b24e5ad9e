//! The console's HTTP server: the listener (plain on loopback, or TLS),
//! the users file, sessions, login and logout, the security headers and
//! the embedded assets. The pages are in `pages`, the actions in
//! `actions`, the token-authenticated read API in `api`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime};

use anyhow::Context;
use askama::Template;
use axum::extract::{ConnectInfo, FromRequestParts, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::session::{LoginLimits, Session, Sessions, COOKIE, IDLE};
use super::users::{Role, Users};
use super::{actions, api, listener, pages};
use crate::daemon::api::Control;
use steward_core::config::Config;

/// What every handler reaches.
pub(super) struct App {
    pub(super) control: Control,
    pub(super) users: UsersFile,
    pub(super) sessions: Sessions,
    pub(super) limits: LoginLimits,
    /// Served over TLS: cookies are `Secure`.
    pub(super) tls: bool,
}

/// The web console, from [`Console::start`] to [`Console::close`].
pub struct Console {
    addr: SocketAddr,
    url: String,
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Console {
    /// Serves the console on `[console] listen`, when set; `None` when
    /// the console is off. Fails when the address cannot be bound or the
    /// TLS files cannot be read.
    pub async fn start(config: &Config, control: Control) -> anyhow::Result<Option<Console>> {
        let Some(listen) = config.console.listen else {
            return Ok(None);
        };
        let tcp = TcpListener::bind(listen)
            .await
            .with_context(|| format!("console.listen: cannot listen on {listen}"))?;
        let addr = tcp.local_addr()?;
        let tls = match &config.console.tls {
            Some(files) => Some(listener::tls_config(&files.cert, &files.key)?),
            None => None,
        };
        let app = Arc::new(App {
            control,
            users: UsersFile::new(config.console.users_file.clone()),
            sessions: Sessions::new(IDLE),
            limits: LoginLimits::default(),
            tls: tls.is_some(),
        });
        let (stop, stopped) = watch::channel(false);
        let router = router(app);
        let scheme = if tls.is_some() { "https" } else { "http" };
        let task = match tls {
            Some(tls) => tokio::spawn(listener::serve(
                listener::TlsListener::new(tcp, tls),
                router,
                stopped,
            )),
            None => tokio::spawn(listener::serve(tcp, router, stopped)),
        };
        let url = format!("{scheme}://{addr}/");
        if app_users_empty(&config.console.users_file) {
            tracing::warn!(
                users = %config.console.users_file.display(),
                "console: the users file names no user, so nobody can log in; add one with \
                 `steward user add -c CONFIG NAME --role viewer|steward|operator`"
            );
        }
        tracing::info!(url = %url, users = %config.console.users_file.display(), "console listening");
        Ok(Some(Console {
            addr,
            url,
            stop,
            task: Mutex::new(Some(task)),
        }))
    }

    /// The address bound (the port the system chose for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR/` or `https://ADDR/`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Stops serving; requests in progress get a moment to finish.
    pub async fn close(&self) {
        let _ = self.stop.send(true);
        let task = self
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(mut task) = task {
            if tokio::time::timeout(std::time::Duration::from_secs(5), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

fn app_users_empty(path: &std::path::Path) -> bool {
    !Users::load(path).is_ok_and(|u| !u.users.is_empty())
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/assets/console.css", get(css))
        .route("/assets/console.js", get(js))
        .merge(pages::routes())
        .merge(actions::routes())
        .merge(api::routes())
        .fallback(not_found)
        .layer(axum::middleware::from_fn(same_origin_posts))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(app)
}

/// Refuses a POST whose `Origin` (sent by browsers) is another site's,
/// before any handler runs: a second line behind the CSRF token and the
/// `SameSite=Strict` cookie.
async fn same_origin_posts(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if request.method() == axum::http::Method::POST {
        let headers = request.headers();
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        if let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) {
            if !same_origin(origin, host) {
                tracing::warn!(
                    origin,
                    host = host.unwrap_or(""),
                    "console: a POST from another site was refused"
                );
                return (
                    StatusCode::FORBIDDEN,
                    "refused: this form was sent from another site\n",
                )
                    .into_response();
            }
        }
    }
    next.run(request).await
}

/// Whether `origin` (`scheme://host[:port]`) names the host the request
/// was sent to.
fn same_origin(origin: &str, host: Option<&str>) -> bool {
    let Some(host) = host else { return false };
    origin
        .split_once("://")
        .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(host))
}

/// Headers on every answer: no framing, no sniffing, no caching of pages
/// that show data, and only the console's own scripts and styles.
async fn security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    let set = |h: &mut HeaderMap, name: header::HeaderName, value: &'static str| {
        h.entry(name).or_insert(HeaderValue::from_static(value));
    };
    set(
        h,
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; \
         form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    );
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, header::X_FRAME_OPTIONS, "DENY");
    set(h, header::REFERRER_POLICY, "same-origin");
    set(h, header::CACHE_CONTROL, "no-store");
    response
}

async fn css() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        include_str!("assets/console.css"),
    )
}

async fn js() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        include_str!("assets/console.js"),
    )
}

async fn not_found(who: Option<Who>) -> Response {
    match who {
        Some(who) => pages::message(
            &who,
            StatusCode::NOT_FOUND,
            "Not found",
            "There is no such page.",
        ),
        None => (StatusCode::NOT_FOUND, "not found\n").into_response(),
    }
}

// ------------------------------------------------------------ users file

/// The users file, read again whenever it changes on disk (a user added,
/// removed or given another role takes effect at the next request).
pub(super) struct UsersFile {
    path: PathBuf,
    cached: Mutex<(Option<FileStamp>, Arc<Users>)>,
}

/// What tells that a file changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl UsersFile {
    fn new(path: PathBuf) -> UsersFile {
        UsersFile {
            path,
            cached: Mutex::new((None, Arc::new(Users::default()))),
        }
    }

    /// The users as the file holds them now. A file that cannot be read
    /// (bad permissions, a syntax error) leaves the last good version in
    /// force and is logged.
    pub(super) fn current(&self) -> Arc<Users> {
        use std::os::unix::fs::MetadataExt;
        let stamp = std::fs::metadata(&self.path).ok().map(|m| FileStamp {
            modified: m.modified().ok(),
            len: m.len(),
            inode: m.ino(),
        });
        let mut cached = self.cached.lock().unwrap_or_else(PoisonError::into_inner);
        if cached.0 != stamp || stamp.is_none() {
            match Users::load(&self.path) {
                Ok(users) => *cached = (stamp, Arc::new(users)),
                Err(e) => {
                    if cached.0 != stamp {
                        tracing::error!(error = %format!("{e:#}"), "console: cannot read the users file; the last version read stays in force");
                        cached.0 = stamp;
                    }
                }
            }
        }
        cached.1.clone()
    }
}

// ------------------------------------------------------------ who is asking

/// The logged-in person making a request.
#[derive(Clone, Debug)]
pub(super) struct Who {
    pub(super) user: String,
    pub(super) role: Role,
    pub(super) session: Session,
    /// The session's id (its cookie's value).
    id: String,
}

impl Who {
    pub(super) fn may(&self, role: Role) -> bool {
        self.role >= role
    }
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.to_string())
}

fn who(app: &App, headers: &HeaderMap) -> Option<Who> {
    let id = cookie(headers, COOKIE)?;
    let session = app.sessions.touch(&id, Instant::now())?;
    let users = app.users.current();
    let Some(user) = users.users.get(&session.user) else {
        // Removed from the users file: every session of theirs ends.
        app.sessions.close_user(&session.user);
        return None;
    };
    Some(Who {
        user: session.user.clone(),
        role: user.role,
        session,
        id,
    })
}

impl FromRequestParts<Arc<App>> for Who {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Who, Response> {
        who(app, &parts.headers).ok_or_else(|| {
            let next = parts
                .uri
                .path_and_query()
                .map_or("/", axum::http::uri::PathAndQuery::as_str);
            if parts.method == axum::http::Method::GET {
                Redirect::to(&format!("/login?next={}", super::pages::encode(next))).into_response()
            } else {
                (
                    StatusCode::FORBIDDEN,
                    "not logged in (or the session expired): log in again\n",
                )
                    .into_response()
            }
        })
    }
}

impl axum::extract::OptionalFromRequestParts<Arc<App>> for Who {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &Arc<App>,
    ) -> Result<Option<Who>, std::convert::Infallible> {
        Ok(who(app, &parts.headers))
    }
}

// ------------------------------------------------------------ login

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    error: Option<String>,
    next: String,
}

#[derive(Deserialize)]
struct NextQuery {
    next: Option<String>,
}

/// Only a path on this site: never an absolute or protocol-relative URL.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n.to_string(),
        _ => "/".to_string(),
    }
}

pub(super) fn render(page: &impl Template) -> Response {
    match page.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot render the page: {e}\n"),
        )
            .into_response(),
    }
}

async fn login_page(
    who: Option<Who>,
    axum::extract::Query(q): axum::extract::Query<NextQuery>,
) -> Response {
    let next = safe_next(q.next.as_deref());
    if who.is_some() {
        return Redirect::to(&next).into_response();
    }
    render(&LoginPage { error: None, next })
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    user: String,
    #[serde(default)]
    password: String,
    next: Option<String>,
}

async fn login(
    State(app): State<Arc<App>>,
    ConnectInfo(listener::Client(client)): ConnectInfo<listener::Client>,
    Form(form): Form<LoginForm>,
) -> Response {
    let next = safe_next(form.next.as_deref());
    let refuse = |status: StatusCode, error: &str| {
        let mut response = render(&LoginPage {
            error: Some(error.to_string()),
            next: next.clone(),
        });
        *response.status_mut() = status;
        response
    };
    let user = form.user.trim().to_string();
    if !app.limits.allow(&user, client.ip()) {
        tracing::warn!(user = %user, client = %client.ip(), "console: login attempts limited");
        return refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many login attempts: wait a minute and try again.",
        );
    }
    let users = app.users.current();
    let password = form.password;
    let name = user.clone();
    // argon2id is deliberately slow: off the async threads.
    let role = tokio::task::spawn_blocking(move || users.verify(&name, &password))
        .await
        .ok()
        .flatten();
    if role.is_none() {
        tracing::info!(user = %user, client = %client.ip(), "console: login refused");
        return refuse(
            StatusCode::UNAUTHORIZED,
            "Unknown user name or wrong password.",
        );
    }
    let id = app.sessions.open(&user, Instant::now());
    tracing::info!(user = %user, client = %client.ip(), "console: logged in");
    let mut response = Redirect::to(&next).into_response();
    let secure = if app.tls { "; Secure" } else { "" };
    let cookie = format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        IDLE.as_secs()
    );
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

#[derive(Deserialize)]
pub(super) struct CsrfOnly {
    pub(super) csrf: Option<String>,
}

async fn logout(State(app): State<Arc<App>>, who: Who, Form(form): Form<CsrfOnly>) -> Response {
    if !Sessions::check_csrf(&who.session, form.csrf.as_deref()) {
        return pages::csrf_refused(&who);
    }
    app.sessions.close(&who.id);
    tracing::info!(user = %who.user, "console: logged out");
    let mut response = Redirect::to("/login").into_response();
    let secure = if app.tls { "; Secure" } else { "" };
    if let Ok(value) = HeaderValue::from_str(&format!(
        "{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}"
    )) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_consoles_own_origin_may_post() {
        assert!(same_origin("http://127.0.0.1:9190", Some("127.0.0.1:9190")));
        assert!(same_origin(
            "https://Console.example:9443",
            Some("console.example:9443")
        ));
        assert!(!same_origin("https://evil.example", Some("127.0.0.1:9190")));
        assert!(!same_origin(
            "http://127.0.0.1:9191",
            Some("127.0.0.1:9190")
        ));
        assert!(!same_origin("null", Some("127.0.0.1:9190")));
        assert!(!same_origin("http://127.0.0.1:9190", None));
    }

    #[test]
    fn the_users_file_is_read_again_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.toml");
        let file = UsersFile::new(path.clone());
        assert!(file.current().users.is_empty(), "no file: nobody");
        let mut users = Users::default();
        users
            .add_user("alice", Role::Viewer, "a long enough password", false)
            .unwrap();
        users.save(&path).unwrap();
        assert_eq!(file.current().users["alice"].role, Role::Viewer);
        users
            .add_user("alice", Role::Operator, "a long enough password", true)
            .unwrap();
        users
            .add_user("bob", Role::Steward, "another long password", false)
            .unwrap();
        users.save(&path).unwrap();
        let now = file.current();
        assert_eq!(
            now.users["alice"].role,
            Role::Operator,
            "a new role counts at once"
        );
        assert_eq!(now.users["bob"].role, Role::Steward);
        // A damaged file leaves the last good version in force.
        std::fs::write(&path, "not = [toml").unwrap();
        assert_eq!(file.current().users.len(), 2);
    }
}
