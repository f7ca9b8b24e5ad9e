//! The streaming half of a replication connection: after START_REPLICATION
//! the connection is in CopyBoth mode, the server sends XLogData and
//! keepalives, and we send standby status updates.

use bytes::BytesMut;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

use super::codec::{self, Backend, ReplicationMessage, ServerFields};
use super::connect::{log_notice, Conn};
use super::error::WireError;
use crate::Lsn;

/// A replication connection in streaming (CopyBoth) mode.
pub struct ReplicationStream {
    conn: Conn,
    /// The server ended the copy; later `recv` calls return `Ok(None)`.
    finished: bool,
}

impl std::fmt::Debug for ReplicationStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationStream")
            .field("backend_pid", &self.conn.backend_pid)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl ReplicationStream {
    pub(crate) fn new(conn: Conn) -> ReplicationStream {
        ReplicationStream {
            conn,
            finished: false,
        }
    }

    /// The next message from the server; `Ok(None)` once the server has
    /// ended the copy.
    ///
    /// Cancel-safe: partial messages stay in the connection's buffer when the
    /// future is dropped, so this can be raced in `tokio::select!`.
    pub async fn recv(&mut self) -> Result<Option<ReplicationMessage>, WireError> {
        if self.finished {
            return Ok(None);
        }
        loop {
            // The only await point; everything after it is synchronous, so a
            // frame, once taken from the buffer, is always handled.
            let Some(frame) = self.conn.read_frame_or_eof().await? else {
                return Err(WireError::Closed);
            };
            match frame.tag {
                b'd' => return codec::parse_replication_payload(frame.body()).map(Some),
                b'c' => {
                    self.finished = true;
                    return Ok(None);
                }
                _ => {}
            }
            match codec::decode(frame)? {
                Backend::Message(Message::CommandComplete(_) | Message::ReadyForQuery(_)) => {
                    self.finished = true;
                    return Ok(None);
                }
                Backend::Message(Message::ErrorResponse(e)) => {
                    self.finished = true;
                    return Err(ServerFields::parse(e.fields())?.into_error());
                }
                Backend::Message(Message::NoticeResponse(n)) => {
                    log_notice(ServerFields::parse(n.fields())?);
                }
                Backend::Message(Message::ParameterStatus(_)) => {}
                other => {
                    return Err(WireError::protocol(format!(
                        "unexpected message {} while streaming replication data",
                        codec::message_name(&other)
                    )))
                }
            }
        }
    }

    /// Sends a standby status update: WAL up to `write` received, up to
    /// `flush` durable (the server may recycle WAL and advance the slot's
    /// confirmed position up to it), up to `apply` applied.
    ///
    /// Not cancel-safe: a dropped call may leave half a message on the wire.
    pub async fn send_status(
        &mut self,
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        reply_requested: bool,
    ) -> Result<(), WireError> {
        let mut buf = BytesMut::with_capacity(40);
        codec::encode_status_update(
            write,
            flush,
            apply,
            codec::pg_now_micros(),
            reply_requested,
            &mut buf,
        );
        self.conn.send(&buf).await
    }

    /// Ends the copy (CopyDone) and the session (Terminate). Send a final
    /// status update first if the server should learn the last flushed LSN.
    ///
    /// Between the two, the server's remaining messages are read and dropped
    /// (for at most a few seconds) until it acknowledges the end of the copy,
    /// so it does not log a broken connection.
    pub async fn close(self) -> Result<(), WireError> {
        self.close_within(CLOSE_DRAIN_TIMEOUT).await
    }

    async fn close_within(mut self, drain_timeout: Duration) -> Result<(), WireError> {
        let mut buf = BytesMut::new();
        frontend::copy_done(&mut buf);
        self.conn.send(&buf).await?;
        let conn = &mut self.conn;
        let drain = async {
            // Errors here only mean the server is already gone.
            while let Ok(Some(frame)) = conn.read_frame_or_eof().await {
                if matches!(frame.tag, b'Z' | b'E') {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(drain_timeout, drain).await;
        buf.clear();
        frontend::terminate(&mut buf);
        // The server may have closed already; Terminate is a courtesy.
        let _ = self.conn.send(&buf).await;
        let _ = self.conn.io.shutdown().await;
        Ok(())
    }
}

/// How long `close` waits for the server to acknowledge the end of the copy.
const CLOSE_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::Transport;
    use bytes::Bytes;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn xlog(start: u64, data: &[u8]) -> Vec<u8> {
        let mut p = vec![b'w'];
        p.extend(start.to_be_bytes());
        p.extend((start + 100).to_be_bytes());
        p.extend(7i64.to_be_bytes());
        p.extend_from_slice(data);
        frame(b'd', &p)
    }

    fn keepalive(end: u64, reply: bool) -> Vec<u8> {
        let mut p = vec![b'k'];
        p.extend(end.to_be_bytes());
        p.extend(9i64.to_be_bytes());
        p.push(u8::from(reply));
        frame(b'd', &p)
    }

    fn pair() -> (ReplicationStream, DuplexStream) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        (
            ReplicationStream::new(Conn::new(Transport::Test(client))),
            server,
        )
    }

    #[tokio::test]
    async fn receives_messages_and_survives_cancellation() {
        let (mut stream, mut server) = pair();
        let msg = xlog(0x10, b"Bbegin-message");
        // Half a message, then a cancelled recv: the bytes must not be lost.
        server.write_all(&msg[..10]).await.unwrap();
        let r = tokio::time::timeout(Duration::from_millis(50), stream.recv()).await;
        assert!(r.is_err(), "recv should still be waiting");
        server.write_all(&msg[10..]).await.unwrap();
        server.write_all(&keepalive(0x20, true)).await.unwrap();
        let m = stream.recv().await.unwrap().unwrap();
        assert_eq!(
            m,
            ReplicationMessage::XLogData {
                wal_start: Lsn(0x10),
                wal_end: Lsn(0x10 + 100),
                server_time_micros: 7,
                data: Bytes::from_static(b"Bbegin-message"),
            }
        );
        let m = stream.recv().await.unwrap().unwrap();
        assert_eq!(
            m,
            ReplicationMessage::Keepalive {
                wal_end: Lsn(0x20),
                server_time_micros: 9,
                reply_requested: true,
            }
        );
    }

    #[tokio::test]
    async fn ignores_parameter_status_and_notices_ends_on_copy_done() {
        let (mut stream, mut server) = pair();
        server
            .write_all(&frame(b'S', b"TimeZone\0UTC\0"))
            .await
            .unwrap();
        server
            .write_all(&frame(b'N', b"SNOTICE\0VNOTICE\0C00000\0Mhello\0\0"))
            .await
            .unwrap();
        server.write_all(&keepalive(1, false)).await.unwrap();
        server.write_all(&frame(b'c', b"")).await.unwrap();
        assert!(matches!(
            stream.recv().await.unwrap(),
            Some(ReplicationMessage::Keepalive { .. })
        ));
        assert_eq!(stream.recv().await.unwrap(), None);
        // Stays ended, even though the peer then closes.
        drop(server);
        assert_eq!(stream.recv().await.unwrap(), None);
    }

    #[tokio::test]
    async fn close_waits_for_the_server_to_end_the_copy() {
        let (stream, mut server) = pair();
        let srv = tokio::spawn(async move {
            let mut got = [0u8; 5];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(got, [b'c', 0, 0, 0, 4]);
            // In-flight data, then the end of the copy.
            let mut out = xlog(1, b"late");
            out.extend(frame(b'c', b""));
            out.extend(frame(b'C', b"START_REPLICATION\0"));
            out.extend(frame(b'Z', b"I"));
            server.write_all(&out).await.unwrap();
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).await.unwrap();
            rest
        });
        stream.close_within(Duration::from_secs(5)).await.unwrap();
        assert_eq!(srv.await.unwrap(), vec![b'X', 0, 0, 0, 4]);
    }

    #[tokio::test]
    async fn error_response_is_a_server_error() {
        let (mut stream, mut server) = pair();
        server
            .write_all(&frame(
                b'E',
                b"SFATAL\0VFATAL\0C57P01\0Mterminating connection due to administrator command\0\0",
            ))
            .await
            .unwrap();
        let e = stream.recv().await.unwrap_err();
        assert_eq!(e.sqlstate(), Some("57P01"));
        assert!(e.is_transient());
    }

    #[tokio::test]
    async fn eof_without_copy_done_is_closed() {
        let (mut stream, server) = pair();
        drop(server);
        assert!(matches!(stream.recv().await, Err(WireError::Closed)));
    }

    #[tokio::test]
    async fn eof_mid_message_is_a_protocol_error() {
        let (mut stream, mut server) = pair();
        server.write_all(&xlog(1, b"abc")[..7]).await.unwrap();
        drop(server);
        assert!(matches!(stream.recv().await, Err(WireError::Protocol(_))));
    }

    #[tokio::test]
    async fn bad_length_and_short_payload_are_errors() {
        let (mut stream, mut server) = pair();
        server.write_all(&frame(b'd', b"w123")).await.unwrap();
        let e = stream.recv().await.unwrap_err();
        assert!(e.to_string().contains("XLogData"), "{e}");

        let (mut stream, mut server) = pair();
        server.write_all(&[b'd', 0, 0, 0, 1]).await.unwrap();
        assert!(matches!(stream.recv().await, Err(WireError::Protocol(_))));
    }

    #[tokio::test]
    async fn sends_status_and_close() {
        let (mut stream, mut server) = pair();
        stream
            .send_status(Lsn(3), Lsn(2), Lsn(1), false)
            .await
            .unwrap();
        let mut got = [0u8; 39];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..6], &[b'd', 0, 0, 0, 38, b'r']);
        assert_eq!(&got[6..14], &3u64.to_be_bytes());
        assert_eq!(&got[14..22], &2u64.to_be_bytes());
        assert_eq!(&got[22..30], &1u64.to_be_bytes());
        assert_eq!(got[38], 0);

        stream
            .close_within(Duration::from_millis(50))
            .await
            .unwrap();
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, vec![b'c', 0, 0, 0, 4, b'X', 0, 0, 0, 4]);
    }
}
