//! How an event is written in a target's outbox.
//!
//! A fixed binary layout: decoding JSON (field names, escape scanning of
//! every string) is the largest cost of reading an outbox back (perf on
//! `cargo bench --bench e2e -- W1`). The first
//! byte is [`FORMAT_V1`], so a later layout can be told apart.
//!
//! Layout (integers little-endian):
//! `0xB1, op: u8, change: u8, tx_id flag: u8 [, tx_id: u32], version: u64`,
//! then `id`, `entity`, `key`, `time` and `data` (JSON text), each as
//! `len: u32` and UTF-8 bytes.

use std::borrow::Cow;

use steward_core::model::{Event, EventData, EventOp, SourceChange};

const FORMAT_V1: u8 = 0xB1;

/// Appends `event` to `out`.
pub(crate) fn encode(event: &Event, out: &mut Vec<u8>) {
    out.push(FORMAT_V1);
    out.push(match event.op {
        EventOp::Upsert => 0,
        EventOp::Delete => 1,
    });
    out.push(match event.change {
        None => 0,
        Some(SourceChange::Insert) => 1,
        Some(SourceChange::Update) => 2,
        Some(SourceChange::Delete) => 3,
        Some(SourceChange::Snapshot) => 4,
    });
    match event.tx_id {
        Some(xid) => {
            out.push(1);
            out.extend_from_slice(&xid.to_le_bytes());
        }
        None => out.push(0),
    }
    out.extend_from_slice(&event.version.to_le_bytes());
    for text in [
        event.id.as_str(),
        event.entity.as_str(),
        event.key.as_str(),
        event.time.as_str(),
        event.data.as_str(),
    ] {
        out.extend_from_slice(&(text.len() as u32).to_le_bytes());
        out.extend_from_slice(text.as_bytes());
    }
}

/// Reads back what [`encode`] wrote.
pub(crate) fn decode(bytes: &[u8]) -> Result<Event, String> {
    check_format(bytes)?;
    let mut r = Reader { bytes, at: 1 };
    let op = match r.u8("op")? {
        0 => EventOp::Upsert,
        1 => EventOp::Delete,
        other => return Err(format!("unknown op {other} at byte 1")),
    };
    let change = match r.u8("change")? {
        0 => None,
        1 => Some(SourceChange::Insert),
        2 => Some(SourceChange::Update),
        3 => Some(SourceChange::Delete),
        4 => Some(SourceChange::Snapshot),
        other => return Err(format!("unknown source change {other} at byte 2")),
    };
    let tx_id = match r.u8("tx_id flag")? {
        0 => None,
        1 => Some(u32::from_le_bytes(r.array("tx_id")?)),
        other => return Err(format!("bad tx_id flag {other} at byte 3")),
    };
    let version = u64::from_le_bytes(r.array("version")?);
    let id = r.text("id")?.to_string();
    let entity = r.text("entity")?.to_string();
    let key = r.text("key")?.to_string();
    let time = r.text("time")?.to_string();
    let data = r.text("data")?.to_string();
    if r.at != bytes.len() {
        return Err(format!(
            "{} bytes after the event's end at byte {}",
            bytes.len() - r.at,
            r.at
        ));
    }
    let data = serde_json::value::RawValue::from_string(data)
        .map_err(|e| format!("data is not JSON: {e}"))?;
    Ok(Event {
        id,
        entity,
        key,
        op,
        version,
        time,
        data: EventData::from_raw(data),
        change,
        tx_id,
    })
}

/// Just the entity of an encoded event (to filter an outbox without decoding it).
pub(crate) fn entity(bytes: &[u8]) -> Result<Cow<'_, str>, String> {
    check_format(bytes)?;
    let mut r = Reader { bytes, at: 3 };
    if r.u8("tx_id flag")? == 1 {
        r.array::<4>("tx_id")?;
    }
    r.array::<8>("version")?;
    r.text("id")?;
    r.text("entity").map(Cow::Borrowed)
}

fn check_format(bytes: &[u8]) -> Result<(), String> {
    match bytes.first() {
        Some(&FORMAT_V1) => Ok(()),
        Some(other) => Err(format!("unknown entry format {other:#04x} at byte 0")),
        None => Err("the entry is empty".into()),
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(format!(
                "{field}: needs {n} bytes at byte {}, the entry has {}",
                self.at,
                self.bytes.len()
            ));
        };
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u8(&mut self, field: &str) -> Result<u8, String> {
        Ok(self.take(1, field)?[0])
    }

    fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    fn text(&mut self, field: &str) -> Result<&'a str, String> {
        let len = u32::from_le_bytes(self.array(field)?) as usize;
        let at = self.at;
        std::str::from_utf8(self.take(len, field)?)
            .map_err(|e| format!("{field} at byte {at} is not UTF-8: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use steward_core::model::Lsn;

    fn event(change: Option<SourceChange>, tx_id: Option<u32>) -> Event {
        Event {
            id: Event::source_id(Lsn(0x16B3748), 3),
            entity: "product".into(),
            key: "a|b\\|c".into(),
            op: EventOp::Upsert,
            version: 0x16B3748,
            time: "2026-11-27T05:00:00.123456Z".into(),
            data: serde_json::json!({"name": "Bolt \"M8\"", "price": 1.5, "tags": [1, null]})
                .into(),
            change,
            tx_id,
        }
    }

    #[test]
    fn round_trips_every_variant() {
        for change in [
            None,
            Some(SourceChange::Insert),
            Some(SourceChange::Update),
            Some(SourceChange::Delete),
            Some(SourceChange::Snapshot),
        ] {
            for tx_id in [None, Some(0), Some(u32::MAX)] {
                for op in [EventOp::Upsert, EventOp::Delete] {
                    let e = Event {
                        op,
                        ..event(change, tx_id)
                    };
                    let mut buf = Vec::new();
                    encode(&e, &mut buf);
                    assert_eq!(decode(&buf).unwrap(), e);
                    assert_eq!(entity(&buf).unwrap(), "product");
                }
            }
        }
    }

    #[test]
    fn entries_of_an_unknown_format_are_errors() {
        let json = serde_json::to_vec(&event(None, None)).unwrap();
        assert!(decode(&json)
            .unwrap_err()
            .contains("unknown entry format 0x7b"));
        assert!(entity(&json).unwrap_err().contains("unknown entry format"));
        assert!(decode(&[]).unwrap_err().contains("empty"));
    }

    #[test]
    fn damaged_entries_are_errors_naming_the_field() {
        let mut buf = Vec::new();
        encode(&event(None, Some(1)), &mut buf);
        for cut in 1..buf.len() {
            let err = decode(&buf[..cut]).unwrap_err();
            assert!(err.contains("bytes at byte"), "cut {cut}: {err}");
        }
        let mut extra = buf.clone();
        extra.push(0);
        assert!(decode(&extra)
            .unwrap_err()
            .contains("after the event's end"));
        let mut bad_op = buf.clone();
        bad_op[1] = 9;
        assert!(decode(&bad_op).unwrap_err().contains("unknown op 9"));
        // The data's length field is the last one before the data itself.
        let data_len_at = buf.len() - event(None, None).data.as_str().len() - 4;
        let mut not_json = buf.clone();
        not_json[data_len_at + 4] = b'}';
        assert!(decode(&not_json).unwrap_err().contains("data is not JSON"));
        let mut not_utf8 = buf.clone();
        not_utf8[data_len_at + 4] = 0xFF;
        assert!(decode(&not_utf8).unwrap_err().contains("data at byte"));
    }

    proptest! {
        #[test]
        fn any_bytes_decode_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
            let _ = entity(&bytes);
            let mut tagged = vec![FORMAT_V1];
            tagged.extend_from_slice(&bytes);
            let _ = decode(&tagged);
            let _ = entity(&tagged);
        }

        #[test]
        fn any_event_round_trips(
            id in ".{0,30}", entity_name in ".{0,20}", key in ".{0,30}", time in ".{0,30}",
            version: u64, tx_id: Option<u32>, text in ".{0,40}", n: i64,
        ) {
            let e = Event {
                id, entity: entity_name, key, op: EventOp::Delete, version, time,
                data: serde_json::json!({"text": text, "n": n}).into(),
                change: Some(SourceChange::Delete), tx_id,
            };
            let mut buf = Vec::new();
            encode(&e, &mut buf);
            prop_assert_eq!(decode(&buf).unwrap(), e);
        }
    }
}
