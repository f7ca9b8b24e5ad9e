//! Byte-level pieces of the protocol that `postgres-protocol` does not cover:
//! message framing with a size cap, the CopyBothResponse message, the
//! replication sub-messages inside CopyData (XLogData, keepalive, standby
//! status update), and quoting for replication commands.
//!
//! Everything here is pure and synchronous so it can be tested byte by byte.

use bytes::{BufMut, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::{ErrorFields, Message};
use postgres_protocol::message::frontend;

use super::error::WireError;
use crate::Lsn;

/// Largest backend message we accept. The server never legitimately sends a
/// message near this size (a single datum is capped at 1 GiB); anything larger
/// is a corrupt stream, and buffering it would defeat the memory bound.
pub(crate) const MAX_MESSAGE_LEN: usize = 1 << 30;

/// Tag of CopyBothResponse, which `postgres-protocol`'s parser does not know.
pub(crate) const COPY_BOTH_RESPONSE_TAG: u8 = b'W';

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01 UTC).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// One complete backend message, header included.
#[derive(Debug)]
pub(crate) struct Frame {
    pub(crate) tag: u8,
    /// Tag, length and body, exactly as received.
    pub(crate) raw: BytesMut,
}

impl Frame {
    /// The body after the 5-byte header.
    pub(crate) fn body(self) -> Bytes {
        self.raw.freeze().slice(5..)
    }
}

/// Takes one complete message off the front of `buf`, or returns `None` (and
/// reserves room for the rest) when it is not all there yet. Nothing is
/// consumed unless a whole message is returned, so callers can retry after
/// any interruption without losing bytes.
pub(crate) fn split_frame(buf: &mut BytesMut) -> Result<Option<Frame>, WireError> {
    if buf.len() < 5 {
        buf.reserve(5 - buf.len());
        return Ok(None);
    }
    let tag = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len < 4 {
        return Err(WireError::protocol(format!(
            "message {} declares length {len}, below the minimum of 4",
            tag_name(tag)
        )));
    }
    if len >= MAX_MESSAGE_LEN {
        return Err(WireError::protocol(format!(
            "message {} declares length {len}, above the limit of {MAX_MESSAGE_LEN} bytes",
            tag_name(tag)
        )));
    }
    let total = len + 1;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    Ok(Some(Frame {
        tag,
        raw: buf.split_to(total),
    }))
}

/// A decoded backend message: the library's, or CopyBothResponse.
pub(crate) enum Backend {
    CopyBothResponse,
    Message(Message),
}

/// Decodes a complete frame with `postgres-protocol`, except CopyBothResponse.
pub(crate) fn decode(frame: Frame) -> Result<Backend, WireError> {
    let tag = frame.tag;
    if tag == COPY_BOTH_RESPONSE_TAG {
        // Body: overall format, column count, per-column formats; replication
        // always uses 0 columns, so nothing in it matters to us.
        return Ok(Backend::CopyBothResponse);
    }
    let mut raw = frame.raw;
    match Message::parse(&mut raw) {
        Ok(Some(m)) => Ok(Backend::Message(m)),
        Ok(None) => Err(WireError::protocol(format!(
            "message {} was incomplete although its declared length was buffered",
            tag_name(tag)
        ))),
        Err(e) => Err(WireError::protocol(format!(
            "malformed message {} from the server: {e}",
            tag_name(tag)
        ))),
    }
}

/// A human-readable name for a backend message tag, for error messages.
pub(crate) fn tag_name(tag: u8) -> String {
    let name = match tag {
        b'R' => "Authentication",
        b'K' => "BackendKeyData",
        b'2' => "BindComplete",
        b'3' => "CloseComplete",
        b'C' => "CommandComplete",
        b'd' => "CopyData",
        b'c' => "CopyDone",
        b'G' => "CopyInResponse",
        b'H' => "CopyOutResponse",
        b'W' => "CopyBothResponse",
        b'D' => "DataRow",
        b'I' => "EmptyQueryResponse",
        b'E' => "ErrorResponse",
        b'v' => "NegotiateProtocolVersion",
        b'n' => "NoData",
        b'N' => "NoticeResponse",
        b'A' => "NotificationResponse",
        b't' => "ParameterDescription",
        b'S' => "ParameterStatus",
        b'1' => "ParseComplete",
        b's' => "PortalSuspended",
        b'Z' => "ReadyForQuery",
        b'T' => "RowDescription",
        _ => "",
    };
    if name.is_empty() {
        format!("with unknown tag {:?}", tag as char)
    } else {
        format!("{name} ('{}')", tag as char)
    }
}

/// The name of a decoded message, for "unexpected message X while Y" errors.
pub(crate) fn message_name(m: &Backend) -> &'static str {
    let m = match m {
        Backend::CopyBothResponse => return "CopyBothResponse",
        Backend::Message(m) => m,
    };
    match m {
        Message::AuthenticationCleartextPassword
        | Message::AuthenticationGss
        | Message::AuthenticationKerberosV5
        | Message::AuthenticationMd5Password(_)
        | Message::AuthenticationOk
        | Message::AuthenticationScmCredential
        | Message::AuthenticationSspi
        | Message::AuthenticationGssContinue(_)
        | Message::AuthenticationSasl(_)
        | Message::AuthenticationSaslContinue(_)
        | Message::AuthenticationSaslFinal(_) => "Authentication",
        Message::BackendKeyData(_) => "BackendKeyData",
        Message::BindComplete => "BindComplete",
        Message::CloseComplete => "CloseComplete",
        Message::CommandComplete(_) => "CommandComplete",
        Message::CopyData(_) => "CopyData",
        Message::CopyDone => "CopyDone",
        Message::CopyInResponse(_) => "CopyInResponse",
        Message::CopyOutResponse(_) => "CopyOutResponse",
        Message::DataRow(_) => "DataRow",
        Message::EmptyQueryResponse => "EmptyQueryResponse",
        Message::ErrorResponse(_) => "ErrorResponse",
        Message::NoData => "NoData",
        Message::NoticeResponse(_) => "NoticeResponse",
        Message::NotificationResponse(_) => "NotificationResponse",
        Message::ParameterDescription(_) => "ParameterDescription",
        Message::ParameterStatus(_) => "ParameterStatus",
        Message::ParseComplete => "ParseComplete",
        Message::PortalSuspended => "PortalSuspended",
        Message::ReadyForQuery(_) => "ReadyForQuery",
        Message::RowDescription(_) => "RowDescription",
        _ => "unknown",
    }
}

/// The fields of an ErrorResponse / NoticeResponse that we use.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct ServerFields {
    pub(crate) severity: String,
    pub(crate) code: String,
    pub(crate) message: String,
    pub(crate) detail: Option<String>,
    pub(crate) hint: Option<String>,
}

impl ServerFields {
    pub(crate) fn parse(mut fields: ErrorFields<'_>) -> Result<ServerFields, WireError> {
        let mut out = ServerFields::default();
        let mut localized_severity = String::new();
        loop {
            let field = match fields.next() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    return Err(WireError::protocol(format!(
                        "malformed ErrorResponse/NoticeResponse fields: {e}"
                    )))
                }
            };
            let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
            match field.type_() {
                b'V' => out.severity = value,
                b'S' => localized_severity = value,
                b'C' => out.code = value,
                b'M' => out.message = value,
                b'D' => out.detail = Some(value),
                b'H' => out.hint = Some(value),
                _ => {}
            }
        }
        if out.severity.is_empty() {
            out.severity = localized_severity;
        }
        Ok(out)
    }

    pub(crate) fn into_error(self) -> WireError {
        WireError::Server {
            severity: self.severity,
            code: self.code,
            message: self.message,
            detail: self.detail,
            hint: self.hint,
        }
    }
}

/// A message the walsender sends inside CopyData while streaming.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// A chunk of WAL; for logical replication one pgoutput message.
    XLogData {
        /// WAL position of the start of `data`.
        wal_start: Lsn,
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// Server clock when sent, µs since 2000-01-01 UTC.
        server_time_micros: i64,
        /// The payload: for logical replication, one pgoutput message
        /// (see [`crate::pgoutput::decode`]).
        data: Bytes,
    },
    /// Primary keepalive; answer with a status update when `reply_requested`.
    Keepalive {
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// Server clock when sent, µs since 2000-01-01 UTC.
        server_time_micros: i64,
        /// The server wants a status update now (else it may end the
        /// connection after `wal_sender_timeout`).
        reply_requested: bool,
    },
}

fn be_u64(payload: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&payload[at..at + 8]);
    u64::from_be_bytes(b)
}

/// Parses the payload of a CopyData message received while streaming.
pub(crate) fn parse_replication_payload(payload: Bytes) -> Result<ReplicationMessage, WireError> {
    match payload.first() {
        Some(b'w') => {
            const HEADER: usize = 1 + 8 + 8 + 8;
            if payload.len() < HEADER {
                return Err(WireError::protocol(format!(
                    "XLogData message is {} bytes, shorter than its {HEADER}-byte header",
                    payload.len()
                )));
            }
            Ok(ReplicationMessage::XLogData {
                wal_start: Lsn(be_u64(&payload, 1)),
                wal_end: Lsn(be_u64(&payload, 9)),
                server_time_micros: be_u64(&payload, 17) as i64,
                data: payload.slice(HEADER..),
            })
        }
        Some(b'k') => {
            const LEN: usize = 1 + 8 + 8 + 1;
            if payload.len() < LEN {
                return Err(WireError::protocol(format!(
                    "primary keepalive message is {} bytes, shorter than the expected {LEN}",
                    payload.len()
                )));
            }
            Ok(ReplicationMessage::Keepalive {
                wal_end: Lsn(be_u64(&payload, 1)),
                server_time_micros: be_u64(&payload, 9) as i64,
                reply_requested: payload[17] != 0,
            })
        }
        Some(&other) => Err(WireError::protocol(format!(
            "unexpected CopyData message type {:?} while streaming (expected 'w' XLogData or 'k' keepalive)",
            other as char
        ))),
        None => Err(WireError::protocol(
            "empty CopyData message while streaming (expected XLogData or keepalive)",
        )),
    }
}

/// Current time in µs since PostgreSQL's epoch (2000-01-01 UTC).
pub(crate) fn pg_now_micros() -> i64 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    unix - PG_EPOCH_OFFSET_MICROS
}

/// Appends a CopyData message holding a standby status update ('r').
pub(crate) fn encode_status_update(
    write: Lsn,
    flush: Lsn,
    apply: Lsn,
    client_time_micros: i64,
    reply_requested: bool,
    out: &mut BytesMut,
) {
    let mut payload = BytesMut::with_capacity(34);
    payload.put_u8(b'r');
    payload.put_u64(write.0);
    payload.put_u64(flush.0);
    payload.put_u64(apply.0);
    payload.put_i64(client_time_micros);
    payload.put_u8(u8::from(reply_requested));
    // CopyData::new only fails for payloads over i32::MAX bytes; 34 is not.
    if let Ok(msg) = frontend::CopyData::new(payload.freeze()) {
        msg.write(out);
    }
}

/// Quotes an identifier for a replication command or SQL: `"..."` with
/// embedded double quotes doubled.
pub fn quote_ident(name: &str) -> String {
    postgres_protocol::escape::escape_identifier(name)
}

/// Quotes a string literal: `'...'` with embedded single quotes doubled; a
/// value with a backslash becomes ` E'...'` with the backslashes doubled, so
/// SQL reads it the same whatever `standard_conforming_strings` is. The
/// replication command grammar has no `E'...'` form: values for it must not
/// contain a backslash (see [`check_no_backslash`]).
pub fn quote_literal(value: &str) -> String {
    postgres_protocol::escape::escape_literal(value)
}

/// Rejects backslashes in a replication command's literal, which the
/// replication grammar reads verbatim but [`quote_literal`] would escape.
pub(crate) fn check_no_backslash(what: &str, value: &str) -> Result<(), WireError> {
    if value.contains('\\') {
        return Err(WireError::protocol(format!(
            "{what} {value:?} contains a backslash, which a replication command cannot carry"
        )));
    }
    Ok(())
}

/// Rejects NUL characters, which cannot travel inside a query message.
pub(crate) fn check_no_nul(what: &str, value: &str) -> Result<(), WireError> {
    if value.contains('\0') {
        return Err(WireError::protocol(format!(
            "{what} contains a NUL character, which PostgreSQL cannot accept"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_bytes(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn frames_split_across_reads() {
        let mut wire = frame_bytes(b'Z', b"I");
        wire.extend(frame_bytes(b'd', b"hello"));
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        // Feed one byte at a time: every prefix must be left untouched.
        for b in wire {
            buf.put_u8(b);
            while let Some(f) = split_frame(&mut buf).unwrap() {
                got.push((f.tag, f.body()));
            }
        }
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], (b'Z', Bytes::from_static(b"I")));
        assert_eq!(got[1], (b'd', Bytes::from_static(b"hello")));
        assert!(buf.is_empty());
    }

    #[test]
    fn partial_frame_is_not_consumed() {
        let wire = frame_bytes(b'd', b"hello world");
        let mut buf = BytesMut::from(&wire[..8]);
        assert!(split_frame(&mut buf).unwrap().is_none());
        assert_eq!(&buf[..], &wire[..8]);
        buf.extend_from_slice(&wire[8..]);
        let f = split_frame(&mut buf).unwrap().unwrap();
        assert_eq!(f.raw.len(), wire.len());
    }

    #[test]
    fn bad_lengths_are_protocol_errors() {
        let mut buf = BytesMut::from(&[b'd', 0, 0, 0, 3][..]);
        let e = split_frame(&mut buf).unwrap_err();
        assert!(matches!(e, WireError::Protocol(_)), "{e}");
        assert!(e.to_string().contains("below the minimum"), "{e}");

        let mut buf = BytesMut::from(&[b'd', 0x7f, 0xff, 0xff, 0xff][..]);
        let e = split_frame(&mut buf).unwrap_err();
        assert!(e.to_string().contains("above the limit"), "{e}");

        let mut buf = BytesMut::from(&[b'd', 0xff, 0xff, 0xff, 0xff][..]);
        assert!(split_frame(&mut buf).is_err());
    }

    #[test]
    fn empty_body_frame() {
        let mut buf = BytesMut::from(&frame_bytes(b'c', b"")[..]);
        let f = split_frame(&mut buf).unwrap().unwrap();
        assert_eq!(f.tag, b'c');
        assert!(matches!(
            decode(f).unwrap(),
            Backend::Message(Message::CopyDone)
        ));
    }

    #[test]
    fn decodes_copy_both_and_library_messages() {
        let mut buf = BytesMut::from(&frame_bytes(b'W', &[0, 0, 0])[..]);
        let f = split_frame(&mut buf).unwrap().unwrap();
        assert!(matches!(decode(f).unwrap(), Backend::CopyBothResponse));

        let mut buf = BytesMut::from(&frame_bytes(b'Z', b"I")[..]);
        let f = split_frame(&mut buf).unwrap().unwrap();
        match decode(f).unwrap() {
            Backend::Message(Message::ReadyForQuery(b)) => assert_eq!(b.status(), b'I'),
            _ => panic!("expected ReadyForQuery"),
        }

        // Unknown tag: a protocol error naming the tag, not a panic.
        let mut buf = BytesMut::from(&frame_bytes(b'?', b"")[..]);
        let f = split_frame(&mut buf).unwrap().unwrap();
        let e = decode(f).err().unwrap();
        assert!(e.to_string().contains("unknown tag '?'"), "{e}");

        // ReadyForQuery with a missing status byte.
        let mut buf = BytesMut::from(&frame_bytes(b'Z', b"")[..]);
        let f = split_frame(&mut buf).unwrap().unwrap();
        assert!(matches!(decode(f), Err(WireError::Protocol(_))));
    }

    #[test]
    fn parses_error_fields() {
        let body = b"SERROR\0VERROR\0C42704\0Mslot missing\0Dsome detail\0Htry this\0\0";
        let mut buf = BytesMut::from(&frame_bytes(b'E', body)[..]);
        let f = split_frame(&mut buf).unwrap().unwrap();
        let Backend::Message(Message::ErrorResponse(b)) = decode(f).unwrap() else {
            panic!("expected ErrorResponse")
        };
        let fields = ServerFields::parse(b.fields()).unwrap();
        assert_eq!(
            fields,
            ServerFields {
                severity: "ERROR".into(),
                code: "42704".into(),
                message: "slot missing".into(),
                detail: Some("some detail".into()),
                hint: Some("try this".into()),
            }
        );
    }

    #[test]
    fn parses_xlogdata() {
        let mut p = vec![b'w'];
        p.extend(0x0000_0001_0000_0010u64.to_be_bytes());
        p.extend(0x0000_0001_0000_0020u64.to_be_bytes());
        p.extend(12345i64.to_be_bytes());
        p.extend(b"Bpayload");
        let m = parse_replication_payload(Bytes::from(p)).unwrap();
        assert_eq!(
            m,
            ReplicationMessage::XLogData {
                wal_start: Lsn(0x1_0000_0010),
                wal_end: Lsn(0x1_0000_0020),
                server_time_micros: 12345,
                data: Bytes::from_static(b"Bpayload"),
            }
        );
    }

    #[test]
    fn parses_xlogdata_with_empty_data() {
        let mut p = vec![b'w'];
        p.extend([0u8; 24]);
        let m = parse_replication_payload(Bytes::from(p)).unwrap();
        assert!(matches!(m, ReplicationMessage::XLogData { data, .. } if data.is_empty()));
    }

    #[test]
    fn parses_keepalive() {
        let mut p = vec![b'k'];
        p.extend(0x16B3748u64.to_be_bytes());
        p.extend((-5i64).to_be_bytes());
        p.push(1);
        let m = parse_replication_payload(Bytes::from(p.clone())).unwrap();
        assert_eq!(
            m,
            ReplicationMessage::Keepalive {
                wal_end: Lsn(0x16B3748),
                server_time_micros: -5,
                reply_requested: true,
            }
        );
        p[17] = 0;
        let m = parse_replication_payload(Bytes::from(p)).unwrap();
        assert!(matches!(
            m,
            ReplicationMessage::Keepalive {
                reply_requested: false,
                ..
            }
        ));
    }

    #[test]
    fn short_payloads_are_protocol_errors() {
        for n in 0..25 {
            let mut p = vec![b'w'];
            p.resize(n.max(1), 0);
            let e = parse_replication_payload(Bytes::from(p)).unwrap_err();
            assert!(e.to_string().contains("XLogData"), "{e}");
        }
        for n in 1..18 {
            let mut p = vec![b'k'];
            p.resize(n, 0);
            let e = parse_replication_payload(Bytes::from(p)).unwrap_err();
            assert!(e.to_string().contains("keepalive"), "{e}");
        }
        let e = parse_replication_payload(Bytes::new()).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        let e = parse_replication_payload(Bytes::from_static(b"x123")).unwrap_err();
        assert!(e.to_string().contains("'x'"), "{e}");
    }

    #[test]
    fn status_update_byte_layout() {
        let mut out = BytesMut::new();
        encode_status_update(
            Lsn(0x0102030405060708),
            Lsn(0x1112131415161718),
            Lsn(0x2122232425262728),
            0x3132333435363738,
            true,
            &mut out,
        );
        let mut expected = vec![b'd', 0, 0, 0, 38, b'r'];
        expected.extend([1, 2, 3, 4, 5, 6, 7, 8]);
        expected.extend([0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18]);
        expected.extend([0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28]);
        expected.extend([0x31, 0x32, 0x33, 0x34, 0x35, 0x36, 0x37, 0x38]);
        expected.push(1);
        assert_eq!(&out[..], &expected[..]);

        let mut out = BytesMut::new();
        encode_status_update(Lsn(0), Lsn(0), Lsn(0), 0, false, &mut out);
        assert_eq!(out.len(), 39);
        assert_eq!(out[38], 0);
    }

    #[test]
    fn pg_clock_is_after_2020() {
        // 2020-01-01 is 631152000 s after 2000-01-01.
        assert!(pg_now_micros() > 631_152_000_000_000);
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("steward"), "\"steward\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_ident(""), "\"\"");
        assert_eq!(quote_literal("pub"), "'pub'");
        assert_eq!(quote_literal("it's"), "'it''s'");
        // Read the same with standard_conforming_strings on or off.
        assert_eq!(quote_literal("a\\b"), " E'a\\\\b'");
        assert_eq!(quote_literal("''"), "''''''");
        assert!(check_no_backslash("replication option value", "a\\b").is_err());
        assert!(check_no_backslash("replication option value", "it's").is_ok());
        assert!(check_no_nul("slot name", "a\0b").is_err());
        assert!(check_no_nul("slot name", "ab").is_ok());
    }
}
