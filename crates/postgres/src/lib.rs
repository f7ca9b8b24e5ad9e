#![warn(missing_docs)]

//! PostgreSQL's logical replication protocol, with no steward types: the
//! walsender client, the pgoutput decoder, SQL quoting, and the connection
//! settings of a source database.
//!
//! ## Walsender client
//!
//! tokio-postgres cannot enter CopyBoth mode, which streaming replication
//! needs, so steward speaks the replication protocol itself: message
//! builders, parsers and SCRAM/md5 come from `postgres-protocol`; framing,
//! TLS negotiation, startup and the replication sub-protocol live here.
//!
//! - [`ReplicationClient`]: a `replication=database` session for
//!   IDENTIFY_SYSTEM, CREATE_REPLICATION_SLOT and simple queries, turned into
//!   a [`ReplicationStream`] by START_REPLICATION.
//! - [`connect_sql`]: an ordinary tokio-postgres client to the same server.

mod change;
mod codec;
mod config;
mod connect;
mod copy_both;
mod error;
mod lsn;
pub mod pgoutput;
mod secret;
mod tls;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::{DataRowBody, Message};
use postgres_protocol::message::frontend;
use tokio::io::AsyncWriteExt;

pub use codec::{quote_ident, quote_literal, ReplicationMessage};
pub use connect::connect_sql;
pub use copy_both::ReplicationStream;
pub use error::{describe_pg_error, WireError};
pub use tls::install_default_provider;

use codec::{Backend, ServerFields};
use connect::{log_notice, note_parameter, Conn};

pub use change::{Change, ChangeOp, Column, Relation, Tuple, TupleValue};
pub use config::{SourceConfig, SourceHost, SslMode, TargetSessionAttrs};
pub use lsn::{Lsn, ParseLsnError};
pub use secret::{Secret, SecretOrigin};

/// The answer to IDENTIFY_SYSTEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SystemIdentity {
    /// The cluster's unique system identifier (a 64-bit number as text).
    pub systemid: String,
    /// The current timeline ID.
    pub timeline: u32,
    /// Current WAL flush position.
    pub xlogpos: Lsn,
    /// The connected database (`None` for physical replication sessions).
    pub dbname: Option<String>,
}

/// What CREATE_REPLICATION_SLOT does with the slot's starting snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotAction {
    /// Export it for other sessions (`SET TRANSACTION SNAPSHOT`) until the
    /// next command on this connection.
    Export,
    /// Do not build one.
    NoExport,
    /// Use it in the current transaction of this connection, which must have
    /// begun with `BEGIN ISOLATION LEVEL REPEATABLE READ` and run no query.
    Use,
}

impl SnapshotAction {
    fn option_value(self) -> &'static str {
        match self {
            SnapshotAction::Export => "export",
            SnapshotAction::NoExport => "nothing",
            SnapshotAction::Use => "use",
        }
    }

    fn legacy_keyword(self) -> &'static str {
        match self {
            SnapshotAction::Export => "EXPORT_SNAPSHOT",
            SnapshotAction::NoExport => "NOEXPORT_SNAPSHOT",
            SnapshotAction::Use => "USE_SNAPSHOT",
        }
    }
}

/// The answer to CREATE_REPLICATION_SLOT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreatedSlot {
    /// Changes committed after this LSN are streamed from the slot.
    pub consistent_point: Lsn,
    /// Set with [`SnapshotAction::Export`].
    pub snapshot_name: Option<String>,
}

/// A `replication=database` session in command mode.
pub struct ReplicationClient {
    conn: Conn,
    server_version_num: u32,
}

impl std::fmt::Debug for ReplicationClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationClient")
            .field("server_version_num", &self.server_version_num)
            .field("backend_pid", &self.conn.backend_pid)
            .finish_non_exhaustive()
    }
}

#[cfg(any(test, feature = "test-pipe"))]
impl ReplicationClient {
    /// A session over an in-memory pipe whose other end a test plays as the
    /// server, already past startup.
    pub fn over_test_pipe(
        io: tokio::io::DuplexStream,
        server_version_num: u32,
    ) -> ReplicationClient {
        ReplicationClient {
            conn: Conn::new(tls::Transport::Test(io)),
            server_version_num,
        }
    }
}

impl ReplicationClient {
    /// Connects with `replication=database`, `application_name=steward` and
    /// session settings that fix the text format of values (ISO dates, UTC,
    /// UTF-8, hex bytea), honoring `source.sslmode` and
    /// `source.connect_timeout`, and waits until the server is ready.
    ///
    /// With several hosts in `source.url`, they are tried in order and the
    /// first in the role `target_session_attrs` asks for is kept.
    pub async fn connect(cfg: &SourceConfig) -> Result<ReplicationClient, WireError> {
        connect::first_fitting(
            cfg,
            async |at| Self::connect_one(at).await,
            async |client: &mut ReplicationClient, _| client.server_role().await,
            async |client: ReplicationClient| {
                let _ = client.close().await;
            },
        )
        .await
    }

    /// Whether the server is in recovery (a standby) and whether its
    /// sessions are read-only.
    pub async fn server_role(&mut self) -> Result<(bool, bool), WireError> {
        let rows = self
            .simple_query(
                "SELECT pg_is_in_recovery()::text, current_setting('transaction_read_only')",
            )
            .await?;
        match rows.first().map(Vec::as_slice) {
            Some([Some(recovery), Some(read_only), ..]) => {
                Ok((recovery == "true", read_only == "on"))
            }
            _ => Err(WireError::protocol(
                "cannot tell whether the server is a standby: unexpected answer to pg_is_in_recovery()",
            )),
        }
    }

    async fn connect_one(cfg: &SourceConfig) -> Result<ReplicationClient, WireError> {
        let conn = connect::open_replication(cfg).await?;
        let mut client = ReplicationClient {
            conn,
            server_version_num: 0,
        };
        client.server_version_num = match client
            .conn
            .params
            .get("server_version")
            .and_then(|v| parse_server_version(v))
        {
            Some(n) => n,
            // Unusual version strings (forks): ask the server directly.
            None => client.show_server_version_num(cfg).await?,
        };
        tracing::debug!(
            server_version_num = client.server_version_num,
            backend_pid = ?client.conn.backend_pid,
            "replication connection to the source established"
        );
        Ok(client)
    }

    async fn show_server_version_num(&mut self, cfg: &SourceConfig) -> Result<u32, WireError> {
        let rows = self.simple_query("SHOW server_version_num").await?;
        rows.first()
            .and_then(|r| r.first())
            .and_then(|v| v.as_deref())
            .and_then(|v| v.trim().parse::<u32>().ok())
            .ok_or_else(|| {
                WireError::protocol(format!(
                    "cannot determine the PostgreSQL version of {}",
                    cfg.url_display
                ))
            })
    }

    /// The server's version as in `server_version_num`, e.g. 150004.
    pub fn server_version_num(&self) -> u32 {
        self.server_version_num
    }

    /// Ends the session politely (Terminate).
    pub async fn close(mut self) -> Result<(), WireError> {
        let mut buf = BytesMut::new();
        frontend::terminate(&mut buf);
        self.conn.send(&buf).await?;
        let _ = self.conn.io.shutdown().await;
        Ok(())
    }

    /// Runs `sql` with the simple query protocol and returns the rows of all
    /// result sets as text. On an ErrorResponse the rest of the response is
    /// read first, so the session stays usable.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, WireError> {
        codec::check_no_nul("query", sql)?;
        let mut buf = BytesMut::new();
        frontend::query(sql, &mut buf)
            .map_err(|e| WireError::protocol(format!("cannot encode query: {e}")))?;
        self.conn.send(&buf).await?;

        let mut rows = Vec::new();
        let mut error: Option<WireError> = None;
        loop {
            let msg = match self.conn.read_message().await? {
                Backend::Message(m) => m,
                Backend::CopyBothResponse => {
                    // Leave copy mode again so the session stays in sync.
                    buf.clear();
                    frontend::copy_done(&mut buf);
                    self.conn.send(&buf).await?;
                    error.get_or_insert_with(|| {
                        WireError::protocol(
                            "simple_query cannot run START_REPLICATION; use start_logical_replication",
                        )
                    });
                    continue;
                }
            };
            match msg {
                Message::RowDescription(_)
                | Message::CommandComplete(_)
                | Message::EmptyQueryResponse
                | Message::NotificationResponse(_)
                | Message::CopyData(_)
                | Message::CopyDone => {}
                Message::DataRow(row) => {
                    if error.is_none() {
                        match parse_row(&row) {
                            Ok(r) => rows.push(r),
                            Err(e) => error = Some(e),
                        }
                    }
                }
                Message::ErrorResponse(e) => {
                    let e = ServerFields::parse(e.fields())?.into_error();
                    error.get_or_insert(e);
                }
                Message::NoticeResponse(n) => log_notice(ServerFields::parse(n.fields())?),
                Message::ParameterStatus(p) => note_parameter(&mut self.conn, &p)?,
                Message::CopyInResponse(_) => {
                    buf.clear();
                    frontend::copy_fail("steward does not send COPY data", &mut buf)
                        .map_err(|e| WireError::protocol(format!("cannot encode CopyFail: {e}")))?;
                    self.conn.send(&buf).await?;
                    error.get_or_insert_with(|| {
                        WireError::protocol("simple_query does not support COPY FROM STDIN")
                    });
                }
                Message::CopyOutResponse(_) => {
                    error.get_or_insert_with(|| {
                        WireError::protocol("simple_query does not support COPY TO STDOUT")
                    });
                }
                Message::ReadyForQuery(_) => {
                    return match error {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    }
                }
                other => {
                    let name = codec::message_name(&Backend::Message(other));
                    error.get_or_insert_with(|| {
                        WireError::protocol(format!(
                            "unexpected message {name} while running a query"
                        ))
                    });
                }
            }
        }
    }

    /// IDENTIFY_SYSTEM: system id, timeline, current WAL position, database.
    pub async fn identify_system(&mut self) -> Result<SystemIdentity, WireError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        parse_identify_system(&rows)
    }

    /// CREATE_REPLICATION_SLOT for a logical slot with the pgoutput plugin;
    /// with `failover`, one that standbys synchronise (PostgreSQL 17+).
    pub async fn create_logical_slot(
        &mut self,
        slot: &str,
        snapshot: SnapshotAction,
        failover: bool,
    ) -> Result<CreatedSlot, WireError> {
        codec::check_no_nul("slot name", slot)?;
        if failover && self.server_version_num < 170000 {
            return Err(failover_unsupported(self.server_version_num));
        }
        let cmd = create_slot_command(slot, snapshot, self.server_version_num, failover);
        let rows = self.simple_query(&cmd).await?;
        parse_created_slot(&rows)
    }

    /// ALTER_REPLICATION_SLOT ... (FAILOVER true|false) (PostgreSQL 17+); the
    /// slot must not be in use.
    pub async fn set_slot_failover(&mut self, slot: &str, failover: bool) -> Result<(), WireError> {
        codec::check_no_nul("slot name", slot)?;
        if self.server_version_num < 170000 {
            return Err(failover_unsupported(self.server_version_num));
        }
        self.simple_query(&format!(
            "ALTER_REPLICATION_SLOT {} (FAILOVER {failover})",
            quote_ident(slot)
        ))
        .await?;
        Ok(())
    }

    /// START_REPLICATION of a logical slot from `start` with output plugin
    /// `options`; returns once the server has entered streaming mode.
    pub async fn start_logical_replication(
        mut self,
        slot: &str,
        start: Lsn,
        options: &[(&str, &str)],
    ) -> Result<ReplicationStream, WireError> {
        codec::check_no_nul("slot name", slot)?;
        for (name, value) in options {
            codec::check_no_nul("replication option name", name)?;
            codec::check_no_nul("replication option value", value)?;
            codec::check_no_backslash("replication option value", value)?;
        }
        let cmd = start_replication_command(slot, start, options);
        let mut buf = BytesMut::new();
        frontend::query(&cmd, &mut buf)
            .map_err(|e| WireError::protocol(format!("cannot encode START_REPLICATION: {e}")))?;
        self.conn.send(&buf).await?;
        let mut error: Option<WireError> = None;
        loop {
            match self.conn.read_message().await? {
                Backend::CopyBothResponse if error.is_none() => {
                    return Ok(ReplicationStream::new(self.conn))
                }
                Backend::Message(Message::ErrorResponse(e)) => {
                    let e = ServerFields::parse(e.fields())?.into_error();
                    error.get_or_insert(e);
                }
                Backend::Message(Message::NoticeResponse(n)) => {
                    log_notice(ServerFields::parse(n.fields())?);
                }
                Backend::Message(Message::ParameterStatus(p)) => {
                    note_parameter(&mut self.conn, &p)?;
                }
                Backend::Message(Message::ReadyForQuery(_)) => {
                    return Err(error.unwrap_or_else(|| {
                        WireError::protocol(
                            "the server finished START_REPLICATION without entering streaming mode",
                        )
                    }))
                }
                other => {
                    return Err(error.unwrap_or_else(|| {
                        WireError::protocol(format!(
                            "unexpected message {} while starting replication",
                            codec::message_name(&other)
                        ))
                    }))
                }
            }
        }
    }
}

fn parse_row(row: &DataRowBody) -> Result<Vec<Option<String>>, WireError> {
    let buf = row.buffer();
    let mut out = Vec::new();
    let mut ranges = row.ranges();
    loop {
        let range = match ranges.next() {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(e) => return Err(WireError::protocol(format!("malformed DataRow: {e}"))),
        };
        match range {
            None => out.push(None),
            Some(r) => {
                let bytes = buf
                    .get(r)
                    .ok_or_else(|| WireError::protocol("DataRow value outside the message"))?;
                let text = std::str::from_utf8(bytes).map_err(|_| {
                    WireError::protocol(
                        "DataRow value is not UTF-8 although client_encoding is UTF8",
                    )
                })?;
                out.push(Some(text.to_string()));
            }
        }
    }
    Ok(out)
}

/// `server_version` ("15.4 (Debian 15.4-1.pgdg120+1)", "16beta2", "9.6.24")
/// as `server_version_num`.
fn parse_server_version(v: &str) -> Option<u32> {
    let token = v.split_whitespace().next()?;
    let mut parts = token.split('.').map(|p| {
        let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u32>().ok()
    });
    let major = parts.next()??;
    let minor = parts.next().flatten().unwrap_or(0);
    if major >= 10 {
        Some(major * 10000 + minor)
    } else {
        let patch = parts.next().flatten().unwrap_or(0);
        Some(major * 10000 + minor * 100 + patch)
    }
}

fn create_slot_command(
    slot: &str,
    snapshot: SnapshotAction,
    server_version_num: u32,
    failover: bool,
) -> String {
    if server_version_num >= 150000 {
        format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT {}{})",
            quote_ident(slot),
            quote_literal(snapshot.option_value()),
            if failover { ", FAILOVER true" } else { "" }
        )
    } else {
        format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput {}",
            quote_ident(slot),
            snapshot.legacy_keyword()
        )
    }
}

fn failover_unsupported(server_version_num: u32) -> WireError {
    WireError::Unsupported(format!(
        "source.failover = true needs PostgreSQL 17 or later (failover slots), but the source \
         runs {}.{}; set source.failover = false, or upgrade the server",
        server_version_num / 10000,
        server_version_num % 10000
    ))
}

fn start_replication_command(slot: &str, start: Lsn, options: &[(&str, &str)]) -> String {
    let mut cmd = format!(
        "START_REPLICATION SLOT {} LOGICAL {start}",
        quote_ident(slot)
    );
    if !options.is_empty() {
        let opts: Vec<String> = options
            .iter()
            .map(|(k, v)| format!("{} {}", quote_ident(k), quote_literal(v)))
            .collect();
        cmd.push_str(" (");
        cmd.push_str(&opts.join(", "));
        cmd.push(')');
    }
    cmd
}

fn single_row<'a>(
    rows: &'a [Vec<Option<String>>],
    command: &str,
    min_columns: usize,
) -> Result<&'a [Option<String>], WireError> {
    match rows {
        [row] if row.len() >= min_columns => Ok(row),
        _ => Err(WireError::protocol(format!(
            "{command} returned {} rows (first with {} columns); expected one row with at least {min_columns} columns",
            rows.len(),
            rows.first().map_or(0, Vec::len)
        ))),
    }
}

fn required<'a>(
    value: &'a Option<String>,
    command: &str,
    column: &str,
) -> Result<&'a str, WireError> {
    value
        .as_deref()
        .ok_or_else(|| WireError::protocol(format!("{command} returned NULL for {column}")))
}

fn parse_lsn(text: &str, command: &str, column: &str) -> Result<Lsn, WireError> {
    text.parse()
        .map_err(|e| WireError::protocol(format!("{command} returned a bad {column}: {e}")))
}

fn parse_identify_system(rows: &[Vec<Option<String>>]) -> Result<SystemIdentity, WireError> {
    const CMD: &str = "IDENTIFY_SYSTEM";
    let row = single_row(rows, CMD, 3)?;
    let timeline = required(&row[1], CMD, "timeline")?;
    Ok(SystemIdentity {
        systemid: required(&row[0], CMD, "systemid")?.to_string(),
        timeline: timeline.parse().map_err(|_| {
            WireError::protocol(format!("{CMD} returned a bad timeline {timeline:?}"))
        })?,
        xlogpos: parse_lsn(required(&row[2], CMD, "xlogpos")?, CMD, "xlogpos")?,
        dbname: row.get(3).cloned().flatten(),
    })
}

fn parse_created_slot(rows: &[Vec<Option<String>>]) -> Result<CreatedSlot, WireError> {
    const CMD: &str = "CREATE_REPLICATION_SLOT";
    let row = single_row(rows, CMD, 3)?;
    Ok(CreatedSlot {
        consistent_point: parse_lsn(
            required(&row[1], CMD, "consistent_point")?,
            CMD,
            "consistent_point",
        )?,
        snapshot_name: row[2].clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::Transport;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    fn s(v: &str) -> Option<String> {
        Some(v.to_string())
    }

    #[test]
    fn server_versions() {
        assert_eq!(
            parse_server_version("15.4 (Debian 15.4-1.pgdg120+1)"),
            Some(150004)
        );
        assert_eq!(parse_server_version("16.0"), Some(160000));
        assert_eq!(parse_server_version("16beta2"), Some(160000));
        assert_eq!(parse_server_version("17devel"), Some(170000));
        assert_eq!(parse_server_version("9.6.24"), Some(90624));
        assert_eq!(parse_server_version("12.17"), Some(120017));
        assert_eq!(parse_server_version(""), None);
        assert_eq!(parse_server_version("EnterpriseDB"), None);
    }

    #[test]
    fn slot_commands_by_version() {
        assert_eq!(
            create_slot_command("steward", SnapshotAction::Export, 150004, false),
            "CREATE_REPLICATION_SLOT \"steward\" LOGICAL pgoutput (SNAPSHOT 'export')"
        );
        assert_eq!(
            create_slot_command("steward", SnapshotAction::NoExport, 160000, false),
            "CREATE_REPLICATION_SLOT \"steward\" LOGICAL pgoutput (SNAPSHOT 'nothing')"
        );
        assert_eq!(
            create_slot_command("steward", SnapshotAction::Use, 150000, false),
            "CREATE_REPLICATION_SLOT \"steward\" LOGICAL pgoutput (SNAPSHOT 'use')"
        );
        assert_eq!(
            create_slot_command("a\"b", SnapshotAction::Export, 140010, false),
            "CREATE_REPLICATION_SLOT \"a\"\"b\" LOGICAL pgoutput EXPORT_SNAPSHOT"
        );
        assert_eq!(
            create_slot_command("s", SnapshotAction::NoExport, 130000, false),
            "CREATE_REPLICATION_SLOT \"s\" LOGICAL pgoutput NOEXPORT_SNAPSHOT"
        );
    }

    #[test]
    fn failover_slot_command() {
        assert_eq!(
            create_slot_command("steward", SnapshotAction::Export, 170000, true),
            "CREATE_REPLICATION_SLOT \"steward\" LOGICAL pgoutput (SNAPSHOT 'export', FAILOVER true)"
        );
        assert!(failover_unsupported(160004)
            .to_string()
            .contains("PostgreSQL 17 or later"));
    }

    #[test]
    fn start_replication_command_quotes() {
        assert_eq!(
            start_replication_command(
                "steward",
                Lsn(0x1_0000_00AB),
                &[("proto_version", "1"), ("publication_names", "it's")]
            ),
            "START_REPLICATION SLOT \"steward\" LOGICAL 1/AB (\"proto_version\" '1', \"publication_names\" 'it''s')"
        );
        assert_eq!(
            start_replication_command("s", Lsn(0), &[]),
            "START_REPLICATION SLOT \"s\" LOGICAL 0/0"
        );
    }

    #[test]
    fn identify_system_rows() {
        let rows = vec![vec![s("7311"), s("1"), s("0/16B3748"), s("odoo")]];
        assert_eq!(
            parse_identify_system(&rows).unwrap(),
            SystemIdentity {
                systemid: "7311".into(),
                timeline: 1,
                xlogpos: Lsn(0x16B3748),
                dbname: Some("odoo".into()),
            }
        );
        let rows = vec![vec![s("7311"), s("1"), s("0/1"), None]];
        assert_eq!(parse_identify_system(&rows).unwrap().dbname, None);
        assert!(parse_identify_system(&[]).is_err());
        assert!(parse_identify_system(&[vec![s("1"), s("x"), s("0/1")]]).is_err());
        assert!(parse_identify_system(&[vec![s("1"), s("1"), s("zz")]]).is_err());
        assert!(parse_identify_system(&[vec![s("1"), None, s("0/1")]]).is_err());
        assert!(parse_identify_system(&[vec![s("1")]]).is_err());
    }

    #[test]
    fn created_slot_rows() {
        let rows = vec![vec![
            s("steward"),
            s("0/1A2B"),
            s("00000003-00000002-1"),
            s("pgoutput"),
        ]];
        assert_eq!(
            parse_created_slot(&rows).unwrap(),
            CreatedSlot {
                consistent_point: Lsn(0x1A2B),
                snapshot_name: Some("00000003-00000002-1".into()),
            }
        );
        let rows = vec![vec![s("steward"), s("0/1A2B"), None, s("pgoutput")]];
        assert_eq!(parse_created_slot(&rows).unwrap().snapshot_name, None);
        assert!(parse_created_slot(&[vec![s("x"), None, None]]).is_err());
    }

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn data_row(values: &[Option<&str>]) -> Vec<u8> {
        let mut body = (values.len() as u16).to_be_bytes().to_vec();
        for v in values {
            match v {
                None => body.extend((-1i32).to_be_bytes()),
                Some(v) => {
                    body.extend((v.len() as i32).to_be_bytes());
                    body.extend(v.as_bytes());
                }
            }
        }
        frame(b'D', &body)
    }

    fn client() -> (ReplicationClient, DuplexStream) {
        let (c, server) = tokio::io::duplex(64 * 1024);
        (
            ReplicationClient {
                conn: Conn::new(Transport::Test(c)),
                server_version_num: 150000,
            },
            server,
        )
    }

    async fn read_query(server: &mut DuplexStream) -> String {
        let mut head = [0u8; 5];
        server.read_exact(&mut head).await.unwrap();
        assert_eq!(head[0], b'Q');
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        server.read_exact(&mut body).await.unwrap();
        String::from_utf8(body[..body.len() - 1].to_vec()).unwrap()
    }

    #[tokio::test]
    async fn simple_query_collects_rows_of_all_result_sets() {
        let (mut c, mut server) = client();
        let srv = tokio::spawn(async move {
            assert_eq!(read_query(&mut server).await, "SELECT 1; SELECT 2");
            let mut out = Vec::new();
            out.extend(frame(b'T', &[0, 0]));
            out.extend(data_row(&[Some("1"), None]));
            out.extend(frame(b'C', b"SELECT 1\0"));
            out.extend(frame(b'T', &[0, 0]));
            out.extend(data_row(&[Some("zwei")]));
            out.extend(frame(b'C', b"SELECT 1\0"));
            out.extend(frame(b'Z', b"I"));
            server.write_all(&out).await.unwrap();
            server
        });
        let rows = c.simple_query("SELECT 1; SELECT 2").await.unwrap();
        assert_eq!(rows, vec![vec![s("1"), None], vec![s("zwei")]]);
        srv.await.unwrap();
    }

    #[tokio::test]
    async fn simple_query_error_drains_to_ready_for_query() {
        let (mut c, mut server) = client();
        let srv = tokio::spawn(async move {
            read_query(&mut server).await;
            let mut out = Vec::new();
            out.extend(frame(b'E', b"SERROR\0VERROR\0C42P01\0Mno such table\0\0"));
            out.extend(frame(b'Z', b"I"));
            server.write_all(&out).await.unwrap();
            assert_eq!(read_query(&mut server).await, "SELECT 3");
            let mut out = Vec::new();
            out.extend(data_row(&[Some("3")]));
            out.extend(frame(b'C', b"SELECT 1\0"));
            out.extend(frame(b'Z', b"I"));
            server.write_all(&out).await.unwrap();
            server
        });
        let e = c.simple_query("SELECT * FROM nope").await.unwrap_err();
        assert_eq!(e.sqlstate(), Some("42P01"));
        // The session is still in sync.
        assert_eq!(
            c.simple_query("SELECT 3").await.unwrap(),
            vec![vec![s("3")]]
        );
        srv.await.unwrap();
    }

    #[tokio::test]
    async fn start_replication_waits_for_copy_both() {
        let (c, mut server) = client();
        let srv = tokio::spawn(async move {
            let q = read_query(&mut server).await;
            assert_eq!(
                q,
                "START_REPLICATION SLOT \"s\" LOGICAL 0/10 (\"proto_version\" '1')"
            );
            let mut out = Vec::new();
            out.extend(frame(b'W', &[0, 0, 0]));
            let mut ka = vec![b'k'];
            ka.extend(0x10u64.to_be_bytes());
            ka.extend(0i64.to_be_bytes());
            ka.push(0);
            out.extend(frame(b'd', &ka));
            server.write_all(&out).await.unwrap();
            server
        });
        let mut stream = c
            .start_logical_replication("s", Lsn(0x10), &[("proto_version", "1")])
            .await
            .unwrap();
        // Bytes that arrived together with CopyBothResponse are not lost.
        assert!(matches!(
            stream.recv().await.unwrap(),
            Some(ReplicationMessage::Keepalive {
                wal_end: Lsn(0x10),
                ..
            })
        ));
        srv.await.unwrap();
    }

    #[tokio::test]
    async fn start_replication_error() {
        let (c, mut server) = client();
        let srv = tokio::spawn(async move {
            read_query(&mut server).await;
            let mut out = Vec::new();
            out.extend(frame(
                b'E',
                b"SERROR\0VERROR\0C55006\0Mreplication slot \"s\" is active for PID 7\0\0",
            ));
            out.extend(frame(b'Z', b"I"));
            server.write_all(&out).await.unwrap();
            server
        });
        let e = c
            .start_logical_replication("s", Lsn(0), &[])
            .await
            .unwrap_err();
        assert_eq!(e.sqlstate(), Some("55006"));
        srv.await.unwrap();
    }
}
