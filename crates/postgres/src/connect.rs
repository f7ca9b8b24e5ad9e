//! Opening connections to the source: the buffered message connection used by
//! the replication client, its startup and authentication, and the ordinary
//! SQL connection (`tokio-postgres`) with the same address and TLS rules.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{
    ChannelBinding, ScramSha256, SCRAM_SHA_256, SCRAM_SHA_256_PLUS,
};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::codec::{self, Backend, Frame, ServerFields};
use super::error::WireError;
use super::tls::{self, Transport};
use crate::{Secret, SourceConfig, SslMode};

/// Session settings that give pgoutput's and queries' text values one
/// predictable format whatever the server's or role's defaults are.
const SESSION_OPTIONS: &str = "-c datestyle=ISO -c timezone=UTC -c intervalstyle=iso_8601 \
     -c extra_float_digits=3 -c bytea_output=hex -c client_encoding=UTF8";

const APPLICATION_NAME: &str = "steward";

/// A protocol connection with its read buffer. All reading goes through
/// [`Conn::read_frame_or_eof`], which keeps partial messages in `rbuf`, so a read
/// future may be dropped at any await point without losing bytes.
pub(crate) struct Conn {
    pub(crate) io: Transport,
    pub(crate) rbuf: BytesMut,
    pub(crate) params: HashMap<String, String>,
    pub(crate) backend_pid: Option<i32>,
}

impl Conn {
    pub(crate) fn new(io: Transport) -> Conn {
        Conn {
            io,
            rbuf: BytesMut::with_capacity(8 * 1024),
            params: HashMap::new(),
            backend_pid: None,
        }
    }

    /// The next complete message, or `None` at a clean end of stream.
    /// Cancel-safe: the only await is `read_buf`, which reads nothing when
    /// it does not complete.
    pub(crate) async fn read_frame_or_eof(&mut self) -> Result<Option<Frame>, WireError> {
        loop {
            if let Some(frame) = codec::split_frame(&mut self.rbuf)? {
                return Ok(Some(frame));
            }
            if self.rbuf.capacity() - self.rbuf.len() < 4096 {
                self.rbuf.reserve(8 * 1024);
            }
            let room = self.rbuf.capacity() - self.rbuf.len();
            let n = self.io.read_buf(&mut self.rbuf).await?;
            if n < room {
                self.io.acknowledge_now();
            }
            if n == 0 {
                if self.rbuf.is_empty() {
                    return Ok(None);
                }
                return Err(WireError::protocol(format!(
                    "the server closed the connection in the middle of a message ({} bytes of it received)",
                    self.rbuf.len()
                )));
            }
        }
    }

    pub(crate) async fn read_message(&mut self) -> Result<Backend, WireError> {
        match self.read_frame_or_eof().await? {
            Some(frame) => codec::decode(frame),
            None => Err(WireError::Closed),
        }
    }

    pub(crate) async fn send(&mut self, buf: &[u8]) -> Result<(), WireError> {
        self.io.write_all(buf).await?;
        self.io.flush().await?;
        Ok(())
    }

    pub(crate) fn note_parameter(&mut self, name: &str, value: &str) {
        self.params.insert(name.to_string(), value.to_string());
    }
}

/// Logs a NoticeResponse: warnings at warn, everything else at info.
pub(crate) fn log_notice(fields: ServerFields) {
    let severity = fields.severity.as_str();
    if matches!(severity, "WARNING") {
        tracing::warn!(code = %fields.code, hint = ?fields.hint, "source server: {}", fields.message);
    } else {
        tracing::info!(code = %fields.code, severity, "source server: {}", fields.message);
    }
}

/// Runs `fut` under `source.connect_timeout` (zero means no limit, as in libpq).
async fn with_timeout<T>(
    cfg: &SourceConfig,
    fut: impl std::future::Future<Output = Result<T, WireError>>,
) -> Result<T, WireError> {
    if cfg.connect_timeout.is_zero() {
        return fut.await;
    }
    match tokio::time::timeout(cfg.connect_timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(WireError::Timeout),
    }
}

fn is_unix_socket(cfg: &SourceConfig) -> bool {
    cfg.host.starts_with('/')
}

/// Opens a replication connection: transport, TLS, startup, authentication,
/// up to the first ReadyForQuery.
pub(crate) async fn open_replication(cfg: &SourceConfig) -> Result<Conn, WireError> {
    let password = current_password(cfg)?;
    with_timeout(cfg, async {
        let io = open_transport(cfg).await?;
        let mut conn = Conn::new(io);
        startup(&mut conn, cfg, password.as_ref()).await?;
        Ok(conn)
    })
    .await
}

async fn open_transport(cfg: &SourceConfig) -> Result<Transport, WireError> {
    if is_unix_socket(cfg) {
        let path = Path::new(&cfg.host).join(format!(".s.PGSQL.{}", cfg.port));
        let stream = UnixStream::connect(&path).await.map_err(|e| {
            WireError::Io(std::io::Error::new(
                e.kind(),
                format!("cannot connect to Unix socket {}: {e}", path.display()),
            ))
        })?;
        return Ok(Transport::Unix(stream));
    }
    let tcp = connect_tcp(cfg).await?;
    let Some(config) = tls::client_config(cfg)? else {
        return Ok(Transport::Tcp(tcp));
    };
    match negotiate_tls(tcp, cfg, Arc::new(config)).await {
        Ok(t) => Ok(t),
        Err(e @ WireError::Tls(_)) if cfg.sslmode == SslMode::Prefer => {
            tracing::warn!(error = %e, "TLS to the source failed; retrying without TLS (source.sslmode = prefer)");
            Ok(Transport::Tcp(connect_tcp(cfg).await?))
        }
        Err(e) => Err(e),
    }
}

async fn connect_tcp(cfg: &SourceConfig) -> Result<TcpStream, WireError> {
    let tcp = TcpStream::connect((cfg.host.as_str(), cfg.port))
        .await
        .map_err(|e| {
            WireError::Io(std::io::Error::new(
                e.kind(),
                format!("cannot connect to {}:{}: {e}", cfg.host, cfg.port),
            ))
        })?;
    // Status updates are small and latency-sensitive.
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

async fn negotiate_tls(
    mut tcp: TcpStream,
    cfg: &SourceConfig,
    config: Arc<rustls::ClientConfig>,
) -> Result<Transport, WireError> {
    let mut buf = BytesMut::new();
    frontend::ssl_request(&mut buf);
    tcp.write_all(&buf).await?;
    // Exactly one byte: anything after it must be part of the TLS handshake,
    // never plaintext buffered here (CVE-2021-23222).
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => {
            let name = tls::server_name(&cfg.host)?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| {
                    WireError::Tls(format!(
                        "TLS handshake with {}:{} failed: {e}{}",
                        cfg.host,
                        cfg.port,
                        if cfg.sslmode == SslMode::VerifyFull {
                            "; check source.sslrootcert and that the certificate names this host"
                        } else {
                            ""
                        }
                    ))
                })?;
            Ok(Transport::Tls(Box::new(stream)))
        }
        b'N' if cfg.sslmode == SslMode::Prefer => Ok(Transport::Tcp(tcp)),
        b'N' => Err(tls_refused(cfg)),
        other => Err(WireError::protocol(format!(
            "unexpected answer {:?} to SSLRequest (expected 'S' or 'N')",
            other as char
        ))),
    }
}

/// The server answered the SSLRequest with 'N' although `sslmode` demands TLS.
fn tls_refused(cfg: &SourceConfig) -> WireError {
    WireError::Tls(format!(
        "the server at {}:{} does not accept TLS connections but source.sslmode = {} requires TLS; \
         enable ssl on the server or set source.sslmode = prefer or disable",
        cfg.host,
        cfg.port,
        cfg.sslmode.as_str()
    ))
}

async fn startup(
    conn: &mut Conn,
    cfg: &SourceConfig,
    password: Option<&Secret>,
) -> Result<(), WireError> {
    codec::check_no_nul("source user", &cfg.user)?;
    codec::check_no_nul("source database name", &cfg.dbname)?;
    let mut buf = BytesMut::new();
    let params = [
        ("user", cfg.user.as_str()),
        ("database", cfg.dbname.as_str()),
        ("replication", "database"),
        ("application_name", APPLICATION_NAME),
        ("options", SESSION_OPTIONS),
    ];
    frontend::startup_message(params, &mut buf)
        .map_err(|e| WireError::protocol(format!("cannot encode the startup message: {e}")))?;
    conn.send(&buf).await?;
    authenticate(conn, cfg, password).await?;
    loop {
        match conn.read_message().await? {
            Backend::Message(Message::ParameterStatus(p)) => note_parameter(conn, &p)?,
            Backend::Message(Message::BackendKeyData(k)) => conn.backend_pid = Some(k.process_id()),
            Backend::Message(Message::NoticeResponse(n)) => {
                log_notice(ServerFields::parse(n.fields())?);
            }
            Backend::Message(Message::ErrorResponse(e)) => {
                return Err(startup_error(ServerFields::parse(e.fields())?, cfg))
            }
            Backend::Message(Message::ReadyForQuery(_)) => return Ok(()),
            other => {
                return Err(WireError::protocol(format!(
                    "unexpected message {} while starting the session",
                    codec::message_name(&other)
                )))
            }
        }
    }
}

pub(crate) fn note_parameter(
    conn: &mut Conn,
    p: &postgres_protocol::message::backend::ParameterStatusBody,
) -> Result<(), WireError> {
    let name = p
        .name()
        .map_err(|e| WireError::protocol(format!("malformed ParameterStatus: {e}")))?;
    let value = p
        .value()
        .map_err(|e| WireError::protocol(format!("malformed ParameterStatus: {e}")))?;
    conn.note_parameter(name, value);
    Ok(())
}

/// Maps an ErrorResponse during startup: authentication failures become
/// [`WireError::Auth`] with a pointer to the configuration.
fn startup_error(f: ServerFields, cfg: &SourceConfig) -> WireError {
    match f.code.as_str() {
        "28P01" => WireError::Auth(format!(
            "password authentication failed for user {:?}; check source.password_file/password_env",
            cfg.user
        )),
        "28000" if f.message.contains("pg_hba.conf") => WireError::Auth(format!(
            "{}; the server's pg_hba.conf must allow this connection for user {:?} \
             (for replication, a line naming the database: \"replication\" lines cover only \
             physical replication)",
            f.message, cfg.user
        )),
        "28000" => WireError::Auth(f.message),
        _ => f.into_error(),
    }
}

/// The password as its file or variable holds it now: every connection
/// reads it again, so a rotated password needs no restart.
fn current_password(cfg: &SourceConfig) -> Result<Option<Secret>, WireError> {
    cfg.password
        .as_ref()
        .map(|p| {
            p.current()
                .map_err(|e| WireError::Auth(format!("cannot read the password: {e}")))
        })
        .transpose()
}

fn password(password: Option<&Secret>) -> Result<&str, WireError> {
    password
        .map(super::secret::Secret::expose)
        .ok_or(WireError::NoPassword)
}

async fn authenticate(
    conn: &mut Conn,
    cfg: &SourceConfig,
    current: Option<&Secret>,
) -> Result<(), WireError> {
    let mut buf = BytesMut::new();
    let mut scram: Option<ScramSha256> = None;
    loop {
        buf.clear();
        let msg = match conn.read_message().await? {
            Backend::Message(m) => m,
            other => {
                return Err(WireError::protocol(format!(
                    "unexpected message {} while authenticating",
                    codec::message_name(&other)
                )))
            }
        };
        match msg {
            Message::AuthenticationOk => return Ok(()),
            Message::AuthenticationCleartextPassword => {
                if !conn.io.is_tls() {
                    tracing::warn!("the source server asked for a cleartext password over an unencrypted connection; use scram-sha-256 in pg_hba.conf or enable TLS");
                }
                frontend::password_message(password(current)?.as_bytes(), &mut buf)
                    .map_err(|_| WireError::Auth("the password contains a NUL byte".into()))?;
                conn.send(&buf).await?;
            }
            Message::AuthenticationMd5Password(body) => {
                let hash = md5_hash(
                    cfg.user.as_bytes(),
                    password(current)?.as_bytes(),
                    body.salt(),
                );
                frontend::password_message(hash.as_bytes(), &mut buf)
                    .map_err(|_| WireError::Auth("cannot encode the md5 response".into()))?;
                conn.send(&buf).await?;
            }
            Message::AuthenticationSasl(body) => {
                let mut has_plain = false;
                let mut has_plus = false;
                let mut mechanisms = body.mechanisms();
                loop {
                    match mechanisms.next() {
                        Ok(Some(SCRAM_SHA_256)) => has_plain = true,
                        Ok(Some(SCRAM_SHA_256_PLUS)) => has_plus = true,
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(e) => {
                            return Err(WireError::protocol(format!(
                                "malformed SASL mechanism list: {e}"
                            )))
                        }
                    }
                }
                let cb_data = conn.io.channel_binding();
                let (mechanism, binding) =
                    match cb_data {
                        Some(data) if has_plus => (
                            SCRAM_SHA_256_PLUS,
                            ChannelBinding::tls_server_end_point(data),
                        ),
                        Some(_) if has_plain => (SCRAM_SHA_256, ChannelBinding::unrequested()),
                        None if has_plain => (SCRAM_SHA_256, ChannelBinding::unsupported()),
                        _ => return Err(WireError::Auth(
                            "the server offers no SASL mechanism steward supports (SCRAM-SHA-256)"
                                .into(),
                        )),
                    };
                tracing::debug!(mechanism, "authenticating to the source with SCRAM");
                let s = ScramSha256::new(password(current)?.as_bytes(), binding);
                frontend::sasl_initial_response(mechanism, s.message(), &mut buf).map_err(|e| {
                    WireError::protocol(format!("cannot encode SASL response: {e}"))
                })?;
                conn.send(&buf).await?;
                scram = Some(s);
            }
            Message::AuthenticationSaslContinue(body) => {
                let s = scram.as_mut().ok_or_else(|| {
                    WireError::protocol("SASL continue message without a SASL exchange")
                })?;
                s.update(body.data()).map_err(|e| {
                    WireError::Auth(format!("invalid SCRAM challenge from the server: {e}"))
                })?;
                frontend::sasl_response(s.message(), &mut buf).map_err(|e| {
                    WireError::protocol(format!("cannot encode SASL response: {e}"))
                })?;
                conn.send(&buf).await?;
            }
            Message::AuthenticationSaslFinal(body) => {
                let s = scram.as_mut().ok_or_else(|| {
                    WireError::protocol("SASL final message without a SASL exchange")
                })?;
                s.finish(body.data()).map_err(|e| {
                    WireError::Auth(format!(
                        "the server's SCRAM proof did not verify ({e}); it may not be the server you configured"
                    ))
                })?;
            }
            Message::AuthenticationKerberosV5
            | Message::AuthenticationScmCredential
            | Message::AuthenticationGss
            | Message::AuthenticationGssContinue(_)
            | Message::AuthenticationSspi => {
                return Err(WireError::Auth(
                    "the server requested an authentication method steward does not support \
                     (GSSAPI/SSPI/Kerberos/SCM); configure pg_hba.conf to use scram-sha-256, md5, \
                     password or trust for this connection"
                        .into(),
                ))
            }
            Message::ErrorResponse(e) => {
                return Err(startup_error(ServerFields::parse(e.fields())?, cfg))
            }
            Message::NoticeResponse(n) => log_notice(ServerFields::parse(n.fields())?),
            other => {
                return Err(WireError::protocol(format!(
                    "unexpected message {} while authenticating",
                    codec::message_name(&Backend::Message(other))
                )))
            }
        }
    }
}

/// Why servers of a multi-host URL were passed over, to report when none fits.
struct HostAttempts<'a> {
    cfg: &'a SourceConfig,
    tried: Vec<String>,
    first_error: Option<WireError>,
    all_refused: bool,
}

impl<'a> HostAttempts<'a> {
    fn new(cfg: &'a SourceConfig) -> HostAttempts<'a> {
        HostAttempts {
            cfg,
            tried: Vec::new(),
            first_error: None,
            all_refused: true,
        }
    }

    /// The server could not be reached or refused the session.
    fn failed(&mut self, at: &SourceConfig, e: WireError) {
        self.tried.push(format!("{}:{}: {e}", at.host, at.port));
        if e.is_transient() {
            self.all_refused = false;
        }
        self.first_error.get_or_insert(e);
    }

    /// The server is up but in the wrong role.
    fn wrong_role(&mut self, at: &SourceConfig, in_recovery: bool) {
        self.all_refused = false;
        let role = if in_recovery {
            "a standby (in recovery)"
        } else {
            "a primary, or read-only"
        };
        self.tried
            .push(format!("{}:{}: is {role}", at.host, at.port));
    }

    /// The error when no server fits: the servers' own error when each
    /// refused alike (wrong password, bad TLS settings), so it is reported
    /// as what it is; otherwise a transient "none fits now".
    fn into_error(self) -> WireError {
        match self.first_error {
            Some(e) if self.all_refused => e,
            _ => WireError::NoSuitableHost {
                url: self.cfg.url_display.clone(),
                wanted: match self.cfg.target_session_attrs {
                    crate::TargetSessionAttrs::Any => String::new(),
                    t => format!(" as target_session_attrs={}", t.as_str()),
                },
                tried: self.tried.join("; "),
            },
        }
    }
}

/// An ordinary (non-replication) SQL connection to the source with the same
/// address, credentials, TLS rules and session settings: with several hosts
/// in the URL, the first that connects in the role `target_session_attrs`
/// asks for. The connection task runs on tokio until the returned client is
/// dropped.
pub async fn connect_sql(cfg: &SourceConfig) -> Result<tokio_postgres::Client, WireError> {
    first_fitting(
        cfg,
        async |at| connect_sql_one(at).await,
        async |client: &mut tokio_postgres::Client, at| {
            let row = client
                .query_one(
                    "SELECT pg_is_in_recovery(), current_setting('transaction_read_only') = 'on'",
                    &[],
                )
                .await
                .map_err(|e| map_pg_error(e, at))?;
            Ok((row.get(0), row.get(1)))
        },
        async |_| {},
    )
    .await
}

/// The connection to the first of `cfg`'s hosts that connects in the role
/// `target_session_attrs` asks for (with one host, to that one): `connect`
/// opens a connection to one server, `role` asks it whether it is in
/// recovery and whether its sessions are read-only, `release` lets one in
/// the wrong role go.
pub(crate) async fn first_fitting<C>(
    cfg: &SourceConfig,
    connect: impl AsyncFn(&SourceConfig) -> Result<C, WireError>,
    role: impl AsyncFn(&mut C, &SourceConfig) -> Result<(bool, bool), WireError>,
    release: impl AsyncFn(C),
) -> Result<C, WireError> {
    if !cfg.needs_host_selection() {
        return connect(cfg).await;
    }
    let mut attempts = HostAttempts::new(cfg);
    for host in cfg.hosts() {
        let at = cfg.at_host(&host);
        let mut client = match connect(&at).await {
            Ok(c) => c,
            Err(e) => {
                attempts.failed(&at, e);
                continue;
            }
        };
        if cfg.target_session_attrs == crate::TargetSessionAttrs::Any {
            return Ok(client);
        }
        match role(&mut client, &at).await {
            Ok((in_recovery, read_only)) => {
                if cfg.target_session_attrs.accepts(in_recovery, read_only) {
                    tracing::debug!(host = %at.host, port = at.port, "server chosen");
                    return Ok(client);
                }
                attempts.wrong_role(&at, in_recovery);
                release(client).await;
            }
            Err(e) => attempts.failed(&at, e),
        }
    }
    Err(attempts.into_error())
}

async fn connect_sql_one(cfg: &SourceConfig) -> Result<tokio_postgres::Client, WireError> {
    let mut pg = tokio_postgres::Config::new();
    pg.user(&cfg.user)
        .dbname(&cfg.dbname)
        .port(cfg.port)
        .application_name(APPLICATION_NAME)
        .options(SESSION_OPTIONS);
    if !cfg.connect_timeout.is_zero() {
        pg.connect_timeout(cfg.connect_timeout);
    }
    if let Some(p) = current_password(cfg)? {
        pg.password(p.expose());
    }
    with_timeout(cfg, async {
        if is_unix_socket(cfg) {
            pg.host_path(&cfg.host)
                .ssl_mode(tokio_postgres::config::SslMode::Disable);
            let (client, connection) = pg
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(|e| map_pg_error(e, cfg))?;
            spawn_connection(connection);
            return Ok(client);
        }
        pg.host(&cfg.host);
        let Some(config) = tls::client_config(cfg)? else {
            pg.ssl_mode(tokio_postgres::config::SslMode::Disable);
            let (client, connection) = pg
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(|e| map_pg_error(e, cfg))?;
            spawn_connection(connection);
            return Ok(client);
        };
        pg.ssl_mode(match cfg.sslmode {
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(config);
        let (client, connection) = pg.connect(tls).await.map_err(|e| map_pg_error(e, cfg))?;
        spawn_connection(connection);
        Ok(client)
    })
    .await
}

fn spawn_connection<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            let error = super::error::describe_pg_error(&e);
            tracing::warn!(%error, "SQL connection to the source ended with an error");
        }
    });
}

/// Maps a tokio-postgres error onto [`WireError`], keeping SQLSTATEs and the
/// transient/permanent distinction.
pub(crate) fn map_pg_error(e: tokio_postgres::Error, cfg: &SourceConfig) -> WireError {
    if let Some(db) = e.as_db_error() {
        let fields = ServerFields {
            severity: db.severity().to_string(),
            code: db.code().code().to_string(),
            message: db.message().to_string(),
            detail: db.detail().map(str::to_string),
            hint: db.hint().map(str::to_string),
        };
        return startup_error(fields, cfg);
    }
    if e.is_closed() {
        return WireError::Closed;
    }
    // tokio-postgres' Display names only the kind ("error connecting to
    // server"); the cause is in the source chain.
    let mut text = e.to_string();
    let mut io_kind = None;
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            io_kind.get_or_insert(io.kind());
        }
        source = s.source();
    }
    // tokio-postgres' wording for an 'N' answer to the SSLRequest: the same
    // advice as on the replication connection, which setup opens later.
    if text.contains("server does not support TLS") {
        return tls_refused(cfg);
    }
    let is_tls = text.contains("TLS") || text.contains("tls");
    if text.contains("password missing") {
        return WireError::NoPassword;
    }
    if io_kind == Some(std::io::ErrorKind::TimedOut) {
        return WireError::Timeout;
    }
    if is_tls {
        return WireError::Tls(text);
    }
    if let Some(kind) = io_kind {
        return WireError::Io(std::io::Error::new(kind, text));
    }
    if text.contains("authentication") || text.contains("SASL") || text.contains("SCRAM") {
        return WireError::Auth(text);
    }
    WireError::Protocol(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Secret;
    use std::time::Duration;
    use tokio::io::DuplexStream;

    fn cfg(password: Option<&str>) -> SourceConfig {
        SourceConfig {
            url_display: "postgresql://steward@localhost/odoo".into(),
            host: "localhost".into(),
            port: 5432,
            user: "steward".into(),
            dbname: "odoo".into(),
            password: password.map(Secret::new),
            sslmode: SslMode::Disable,
            sslrootcert: None,
            connect_timeout: Duration::from_secs(5),
            slot: "steward".into(),
            publication: "steward".into(),
            status_interval: Duration::from_secs(10),
            create_publication: false,
            heartbeat_interval: None,
            streaming: true,
            other_hosts: Vec::new(),
            target_session_attrs: crate::TargetSessionAttrs::Any,
            failover: false,
            heartbeat_via: None,
        }
    }

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    async fn read_startup(server: &mut DuplexStream) -> Vec<u8> {
        let mut len = [0u8; 4];
        server.read_exact(&mut len).await.unwrap();
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize - 4];
        server.read_exact(&mut body).await.unwrap();
        body
    }

    async fn read_message(server: &mut DuplexStream) -> (u8, Vec<u8>) {
        let mut head = [0u8; 5];
        server.read_exact(&mut head).await.unwrap();
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        server.read_exact(&mut body).await.unwrap();
        (head[0], body)
    }

    fn md5_request() -> Vec<u8> {
        let mut body = 5i32.to_be_bytes().to_vec();
        body.extend([1, 2, 3, 4]);
        frame(b'R', &body)
    }

    #[tokio::test]
    async fn startup_with_md5_collects_parameters() {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let srv = tokio::spawn(async move {
            let startup = read_startup(&mut server).await;
            let text = String::from_utf8_lossy(&startup).into_owned();
            assert!(text.contains("replication\0database\0"), "{text:?}");
            assert!(text.contains("application_name\0steward\0"), "{text:?}");
            assert!(text.contains("-c timezone=UTC"), "{text:?}");
            server.write_all(&md5_request()).await.unwrap();
            let (tag, body) = read_message(&mut server).await;
            assert_eq!(tag, b'p');
            let expected = md5_hash(b"steward", b"pw", [1, 2, 3, 4]);
            assert_eq!(&body[..body.len() - 1], expected.as_bytes());
            let mut out = frame(b'R', &0i32.to_be_bytes());
            out.extend(frame(b'S', b"server_version\x0015.4 (Debian)\0"));
            let mut key = 4242i32.to_be_bytes().to_vec();
            key.extend(7i32.to_be_bytes());
            out.extend(frame(b'K', &key));
            out.extend(frame(b'Z', b"I"));
            server.write_all(&out).await.unwrap();
            server
        });
        let mut conn = Conn::new(Transport::Test(client));
        let c = cfg(Some("pw"));
        startup(&mut conn, &c, c.password.as_ref()).await.unwrap();
        assert_eq!(
            conn.params.get("server_version").map(String::as_str),
            Some("15.4 (Debian)")
        );
        assert_eq!(conn.backend_pid, Some(4242));
        srv.await.unwrap();
    }

    #[tokio::test]
    async fn password_request_without_password() {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let srv = tokio::spawn(async move {
            read_startup(&mut server).await;
            server.write_all(&md5_request()).await.unwrap();
            server
        });
        let mut conn = Conn::new(Transport::Test(client));
        let c = cfg(None);
        let e = startup(&mut conn, &c, c.password.as_ref())
            .await
            .unwrap_err();
        assert!(matches!(e, WireError::NoPassword), "{e}");
        srv.await.unwrap();
    }

    #[tokio::test]
    async fn wrong_password_is_an_auth_error_without_the_password() {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let srv = tokio::spawn(async move {
            read_startup(&mut server).await;
            server
                .write_all(&frame(b'R', &3i32.to_be_bytes()))
                .await
                .unwrap();
            let (tag, _) = read_message(&mut server).await;
            assert_eq!(tag, b'p');
            server
                .write_all(&frame(
                    b'E',
                    b"SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed for user \"steward\"\0\0",
                ))
                .await
                .unwrap();
            server
        });
        let mut conn = Conn::new(Transport::Test(client));
        let c = cfg(Some("hunter2"));
        let e = startup(&mut conn, &c, c.password.as_ref())
            .await
            .unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, WireError::Auth(_)), "{text}");
        assert!(text.contains("source.password_file"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!format!("{e:?}").contains("hunter2"));
        srv.await.unwrap();
    }

    fn closed_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    #[tokio::test]
    async fn no_reachable_host_is_a_transient_error_naming_each() {
        let mut c = cfg(None);
        c.host = "127.0.0.1".into();
        c.port = closed_port();
        let second = closed_port();
        c.other_hosts = vec![crate::SourceHost {
            host: "127.0.0.1".into(),
            port: second,
        }];
        c.target_session_attrs = crate::TargetSessionAttrs::ReadWrite;
        let e = connect_sql(&c).await.unwrap_err();
        assert!(matches!(e, WireError::NoSuitableHost { .. }), "{e}");
        assert!(e.is_transient());
        let text = e.to_string();
        assert!(text.contains("target_session_attrs=read-write"), "{text}");
        assert!(text.contains(&format!("127.0.0.1:{}", c.port)), "{text}");
        assert!(text.contains(&format!("127.0.0.1:{second}")), "{text}");
    }

    #[test]
    fn hosts_refusing_alike_report_their_own_error() {
        let c = cfg(None);
        let mut attempts = HostAttempts::new(&c);
        attempts.failed(&c, WireError::Auth("password authentication failed".into()));
        attempts.failed(&c, WireError::Auth("password authentication failed".into()));
        assert!(attempts.into_error().is_auth_failure());
        let mut attempts = HostAttempts::new(&c);
        attempts.failed(&c, WireError::Auth("refused".into()));
        attempts.wrong_role(&c, true);
        let e = attempts.into_error();
        assert!(e.to_string().contains("is a standby (in recovery)"), "{e}");
    }

    #[tokio::test]
    async fn unsupported_auth_method() {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let srv = tokio::spawn(async move {
            read_startup(&mut server).await;
            server
                .write_all(&frame(b'R', &7i32.to_be_bytes()))
                .await
                .unwrap();
            server
        });
        let mut conn = Conn::new(Transport::Test(client));
        let c = cfg(Some("pw"));
        let e = startup(&mut conn, &c, c.password.as_ref())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("pg_hba.conf"), "{e}");
        srv.await.unwrap();
    }
}
