//! Store tests: round trips, persistence, isolation between targets, exact
//! numbers, a simulated full disk, and commit timing.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::tables::CHUNK_MAX_BYTES;
use super::*;
use steward_core::model::EventOp;

fn event(n: u64, data: serde_json::Value) -> Event {
    Event {
        change: None,
        tx_id: None,
        id: Event::source_id(Lsn(0x1000 + n), n as u32),
        entity: "product".into(),
        key: n.to_string(),
        op: EventOp::Upsert,
        version: 0x1000 + n,
        time: "2024-05-01T12:00:00.000Z".into(),
        data: data.into(),
    }
}

fn sample(n: u64) -> Event {
    event(
        n,
        serde_json::json!({ "id": n, "name": format!("Product {n}"), "active": true }),
    )
}

fn temp() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state").join("steward.redb");
    (dir, path)
}

fn commit_n(
    store: &Store,
    lsn: u64,
    target: &str,
    range: std::ops::Range<u64>,
) -> Vec<(String, u64)> {
    let events: Vec<Event> = range.map(sample).collect();
    let appends: Vec<(&str, &Event)> = events.iter().map(|e| (target, e)).collect();
    store.commit(Lsn(lsn), &appends).unwrap()
}

#[test]
fn commit_read_ack_backlog_round_trip() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    assert_eq!(store.checkpoint().unwrap(), None);
    assert_eq!(store.backlog("wms").unwrap(), 0);
    assert!(store.read_outbox("wms", None, 10).unwrap().is_empty());
    assert_eq!(store.oldest_pending("wms").unwrap(), None);

    let last = commit_n(&store, 100, "wms", 1..4);
    assert_eq!(last, vec![("wms".to_string(), 3)]);
    assert_eq!(store.checkpoint().unwrap(), Some(Lsn(100)));
    assert_eq!(store.backlog("wms").unwrap(), 3);

    let read = store.read_outbox("wms", None, 10).unwrap();
    assert_eq!(
        read.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(read[0].1, sample(1));
    assert_eq!(read[2].1, sample(3));

    store.ack("wms", 2, 2).unwrap();
    assert_eq!(store.backlog("wms").unwrap(), 1);
    assert_eq!(store.oldest_pending("wms").unwrap(), Some((3, sample(3))));
    let stats = store.target_stats("wms").unwrap();
    assert_eq!(stats.backlog, 1);
    assert_eq!(stats.delivered_total, 2);
    assert_eq!(stats.last_delivered_seq, Some(2));
    assert_eq!(stats.last_appended_seq, 3);
    let at = stats.last_delivered_at.expect("delivery time");
    assert!(chrono::DateTime::parse_from_rfc3339(&at).is_ok(), "{at}");

    // Sequence numbers continue after an emptied outbox; they are never reused.
    store.ack("wms", 3, 1).unwrap();
    assert_eq!(store.backlog("wms").unwrap(), 0);
    let last = commit_n(&store, 200, "wms", 4..5);
    assert_eq!(last, vec![("wms".to_string(), 4)]);
    assert_eq!(store.read_outbox("wms", None, 10).unwrap()[0].0, 4);
    assert!(store.file_size() > 0);
}

#[test]
fn outbox_is_in_sequence_order_and_pages_by_after_and_max() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    commit_n(&store, 1, "t", 0..300);
    commit_n(&store, 2, "t", 300..600);
    let mut after = None;
    let mut seen = Vec::new();
    loop {
        let page = store.read_outbox("t", after, 64).unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 64);
        after = Some(page.last().unwrap().0);
        seen.extend(page);
    }
    assert_eq!(seen.len(), 600);
    for (i, (seq, ev)) in seen.iter().enumerate() {
        assert_eq!(*seq, i as u64 + 1);
        assert_eq!(ev.key, i.to_string());
    }
    assert!(store
        .read_outbox("t", Some(u64::MAX), 10)
        .unwrap()
        .is_empty());
    assert!(store.read_outbox("t", None, 0).unwrap().is_empty());
}

#[test]
fn targets_are_independent() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    let events: Vec<Event> = (0..6).map(sample).collect();
    // Interleaved, as the pipeline produces them: each event goes to both targets.
    let appends: Vec<(&str, &Event)> = events.iter().flat_map(|e| [("a", e), ("b", e)]).collect();
    let mut last = store.commit(Lsn(10), &appends).unwrap();
    last.sort();
    assert_eq!(last, vec![("a".to_string(), 6), ("b".to_string(), 6)]);

    store.ack("a", 6, 6).unwrap();
    store
        .set_target_error("b", Some("HTTP 503 from https://b.example/: busy"))
        .unwrap();
    assert_eq!(store.backlog("a").unwrap(), 0);
    assert_eq!(store.backlog("b").unwrap(), 6);
    assert_eq!(store.read_outbox("b", None, 100).unwrap().len(), 6);
    assert_eq!(store.target_stats("a").unwrap().last_error, None);
    assert_eq!(
        store.target_stats("b").unwrap().last_error.as_deref(),
        Some("HTTP 503 from https://b.example/: busy")
    );
    assert_eq!(store.target_stats("b").unwrap().delivered_total, 0);
    assert_eq!(
        store.targets().unwrap(),
        vec!["a".to_string(), "b".to_string()]
    );

    // A successful delivery clears the error; so does set_target_error(None).
    store.ack("b", 1, 1).unwrap();
    assert_eq!(store.target_stats("b").unwrap().last_error, None);
    store.set_target_error("c", Some("x")).unwrap();
    store.set_target_error("c", None).unwrap();
    assert_eq!(store.target_stats("c").unwrap().last_error, None);
    assert_eq!(store.targets().unwrap().len(), 3);
}

#[test]
fn checkpoint_outbox_and_meta_persist_across_reopen() {
    let (_dir, path) = temp();
    {
        let store = Store::open(&path).unwrap();
        commit_n(&store, 0x16B3748, "wms", 0..5);
        store.set_meta("system_id", "7312345678901234567").unwrap();
        store.set_meta("slot", "steward").unwrap();
        // The checkpoint never moves backwards.
        store.commit(Lsn(5), &[]).unwrap();
        assert_eq!(store.checkpoint().unwrap(), Some(Lsn(0x16B3748)));
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(store.checkpoint().unwrap(), Some(Lsn(0x16B3748)));
    assert_eq!(store.backlog("wms").unwrap(), 5);
    assert_eq!(store.read_outbox("wms", None, 10).unwrap().len(), 5);
    assert_eq!(
        store.get_meta("system_id").unwrap().as_deref(),
        Some("7312345678901234567")
    );
    assert_eq!(store.get_meta("slot").unwrap().as_deref(), Some("steward"));
    assert_eq!(store.get_meta("database").unwrap(), None);
}

/// redb takes an exclusive `flock` on its own open file description, so a
/// second open conflicts even inside the same process; no child process needed.
#[test]
fn second_open_is_locked_with_a_clear_message() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    let err = Store::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("another steward process"), "{msg}");
    assert!(msg.contains("steward.redb"), "{msg}");
    drop(store);
    Store::open(&path).unwrap();
}

#[test]
fn numbers_round_trip_exactly() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    let text = r#"{"price":123.4500,"big":123456789012345678901234567890,"tiny":1e-400,"neg":-0.0,"s":"ü\u0000\"","n":null,"nested":{"a":[1.10,2]}}"#;
    let data: serde_json::Value = serde_json::from_str(text).unwrap();
    let ev = event(1, data);
    store.commit(Lsn(1), &[("t", &ev)]).unwrap();
    let (_, back) = store.oldest_pending("t").unwrap().unwrap();
    assert_eq!(back, ev);
    let out = serde_json::to_string(&back.data).unwrap();
    assert!(out.contains("123.4500"), "{out}");
    assert!(out.contains("123456789012345678901234567890"), "{out}");
    assert!(out.contains("1e-400"), "{out}");
    assert!(out.contains("1.10"), "{out}");
}

#[test]
fn unusual_target_names_stay_apart() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    let e = sample(1);
    store
        .commit(Lsn(1), &[("a:b", &e), ("a", &e), ("", &e), ("ü/ü", &e)])
        .unwrap();
    for t in ["a:b", "a", "", "ü/ü"] {
        assert_eq!(store.backlog(t).unwrap(), 1, "{t:?}");
    }
    assert_eq!(store.backlog("b").unwrap(), 0);
}

#[test]
fn long_errors_are_cut_at_a_character_boundary() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    let long = "é".repeat(5000);
    store.set_target_error("t", Some(&long)).unwrap();
    let kept = store.target_stats("t").unwrap().last_error.unwrap();
    assert!(kept.len() <= MAX_ERROR_BYTES && !kept.is_empty());
}

#[test]
fn many_lazy_acks_keep_the_file_bounded() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    commit_n(&store, 1, "t", 0..5000);
    let size_before = store.file_size();
    for seq in 1..=5000 {
        store.ack("t", seq, 1).unwrap();
    }
    assert_eq!(store.backlog("t").unwrap(), 0);
    let size_after = store.file_size();
    println!("file size: {size_before} after commit, {size_after} after 5000 acks");
    assert!(
        size_after < size_before * 4 + 16 * 1024 * 1024,
        "{size_before} -> {size_after}"
    );
}

#[test]
fn commit_of_20000_events_timing() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    let events: Vec<Event> = (0..20_000)
        .map(|n| {
            event(
                n,
                serde_json::json!({
                    "id": n, "default_code": format!("SKU-{n:06}"), "name": format!("Product number {n}"),
                    "list_price": "123.4500".parse::<serde_json::Number>().unwrap(),
                    "active": true, "categ_id": 12, "uom": "Units", "barcode": format!("{:013}", n * 7919),
                }),
            )
        })
        .collect();
    let appends: Vec<(&str, &Event)> = events.iter().map(|e| ("wms", e)).collect();
    let appends2: Vec<(&str, &Event)> = events.iter().map(|e| ("erp", e)).collect();
    // Warm-up commit so the timing below is of a steady state, not file creation.
    store.commit(Lsn(1), &appends[..100]).unwrap();
    let start = Instant::now();
    store.commit(Lsn(2), &appends).unwrap();
    let one = start.elapsed();
    let start = Instant::now();
    store.commit(Lsn(3), &appends2).unwrap();
    let two = start.elapsed();
    println!(
        "commit of 20000 events: {one:?} (first), {two:?} (second target); file {} bytes",
        store.file_size()
    );
    let start = Instant::now();
    let read = store.read_outbox("wms", None, 20_000).unwrap();
    println!(
        "read_outbox of {} events: {:?}",
        read.len(),
        start.elapsed()
    );
    let start = Instant::now();
    store.ack("wms", 20_100, 20_100).unwrap();
    println!("ack of 20100 events: {:?}", start.elapsed());
    assert_eq!(store.backlog("wms").unwrap(), 0);
    assert_eq!(store.backlog("erp").unwrap(), 20_000);
}

/// A file backend whose writes fail with ENOSPC while `full` is set.
#[derive(Debug)]
struct FillableDisk {
    file: redb::backends::FileBackend,
    full: Arc<AtomicBool>,
}

impl FillableDisk {
    fn check(&self) -> io::Result<()> {
        if self.full.load(Ordering::SeqCst) {
            Err(io::Error::from_raw_os_error(
                nix::errno::Errno::ENOSPC as i32,
            ))
        } else {
            Ok(())
        }
    }
}

impl redb::StorageBackend for FillableDisk {
    fn len(&self) -> std::result::Result<u64, redb::BackendError> {
        self.file.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::result::Result<(), redb::BackendError> {
        self.file.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::result::Result<(), redb::BackendError> {
        self.check()?;
        self.file.set_len(len)
    }
    fn sync_data(&self) -> std::result::Result<(), redb::BackendError> {
        self.check()?;
        self.file.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::result::Result<(), redb::BackendError> {
        self.check()?;
        self.file.write(offset, data)
    }
}

#[test]
fn full_disk_is_reported_and_recovered_from_once_space_is_freed() {
    let (_dir, path) = temp();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let full = Arc::new(AtomicBool::new(false));
    let (file_path, flag) = (path.clone(), full.clone());
    let store = Store::open_with(
        &path,
        Box::new(move || {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&file_path)
                .map_err(|e| StoreError::from_io(&file_path, e))?;
            let backend = FillableDisk {
                file: redb::backends::FileBackend::new(file),
                full: flag.clone(),
            };
            redb::Builder::new()
                .create_with_backend(backend)
                .map_err(|e| StoreError::from_redb(&file_path, e))
        }),
    )
    .unwrap();
    commit_n(&store, 10, "t", 0..3);

    full.store(true, Ordering::SeqCst);
    let events: Vec<Event> = (3..5).map(sample).collect();
    let appends: Vec<(&str, &Event)> = events.iter().map(|e| ("t", e)).collect();
    let err = store.commit(Lsn(20), &appends).unwrap_err();
    assert!(err.is_disk_full(), "{err:?}");
    assert!(err.to_string().contains("until space is freed"), "{err}");
    // Still full: the retry fails the same way (the reopen itself may be what fails).
    let err = store.commit(Lsn(20), &appends).unwrap_err();
    assert!(
        err.is_disk_full() || matches!(err, StoreError::Io { .. }),
        "{err:?}"
    );

    full.store(false, Ordering::SeqCst);
    let last = store.commit(Lsn(20), &appends).unwrap();
    assert_eq!(last, vec![("t".to_string(), 5)]);
    assert_eq!(store.checkpoint().unwrap(), Some(Lsn(20)));
    let keys: Vec<String> = store
        .read_outbox("t", None, 10)
        .unwrap()
        .into_iter()
        .map(|(_, e)| e.key)
        .collect();
    assert_eq!(keys, ["0", "1", "2", "3", "4"]);
}

#[test]
fn partly_acknowledged_chunks_are_skipped_by_readers() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    // 3000 small events in one commit: several chunks (CHUNK_MAX_EVENTS / CHUNK_MAX_BYTES).
    commit_n(&store, 1, "t", 0..3000);
    for up_to in [1u64, 7, 1023, 1024, 1025, 2047, 2999] {
        store.ack("t", up_to, 1).unwrap();
        assert_eq!(store.backlog("t").unwrap(), 3000 - up_to);
        let (seq, ev) = store.oldest_pending("t").unwrap().unwrap();
        assert_eq!(seq, up_to + 1);
        assert_eq!(ev.key, up_to.to_string());
        // Even a reader starting before the acknowledged point only sees pending entries.
        let page = store.read_outbox("t", None, 5).unwrap();
        assert_eq!(page[0].0, up_to + 1);
        let page = store
            .read_outbox("t", Some(up_to.saturating_sub(3)), 2)
            .unwrap();
        assert_eq!(
            page.iter().map(|p| p.0).collect::<Vec<_>>().first(),
            Some(&(up_to + 1))
        );
    }
    // Acknowledging past the end does not swallow later appends.
    store.ack("t", 10_000, 1).unwrap();
    assert_eq!(store.backlog("t").unwrap(), 0);
    assert_eq!(store.oldest_pending("t").unwrap(), None);
    commit_n(&store, 2, "t", 3000..3002);
    assert_eq!(store.backlog("t").unwrap(), 2);
    let page = store.read_outbox("t", None, 10).unwrap();
    assert_eq!(
        page.iter().map(|p| p.0).collect::<Vec<_>>(),
        vec![3001, 3002]
    );
    assert_eq!(
        store.target_stats("t").unwrap().last_delivered_seq,
        Some(3000)
    );
}

#[test]
fn events_larger_than_a_chunk_are_stored_alone() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    let big = event(
        1,
        serde_json::json!({ "blob": "x".repeat(CHUNK_MAX_BYTES * 2) }),
    );
    let small = sample(2);
    store
        .commit(
            Lsn(1),
            &[("t", &small), ("t", &big), ("t", &small), ("t", &big)],
        )
        .unwrap();
    let page = store.read_outbox("t", None, 10).unwrap();
    assert_eq!(page.len(), 4);
    assert_eq!(page[1].1, big);
    assert_eq!(page[2].1, small);
    store.ack("t", 2, 2).unwrap();
    assert_eq!(store.read_outbox("t", None, 10).unwrap()[0], (3, small));
}

fn audit_record(n: u64, time_micros: i64) -> governance::AuditRecord {
    governance::AuditRecord {
        time_micros,
        entity: "product".into(),
        key: (n % 7).to_string(),
        version: n,
        target: Some("wms".into()),
        decision: "delivered".into(),
        detail: "upsert".into(),
        user: None,
        comment: None,
        seq: None,
    }
}

fn audit_delta(records: impl IntoIterator<Item = governance::AuditRecord>) -> governance::GovDelta {
    governance::GovDelta {
        ops: records.into_iter().map(governance::GovOp::Audit).collect(),
        ..Default::default()
    }
}

#[test]
fn audit_records_keep_their_order_across_chunks_and_commits() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    // 2,500 records in one commit span three chunks; two more commits follow.
    let mut n = 0;
    for (i, count) in [2_500u64, 1, 40].into_iter().enumerate() {
        let delta = audit_delta((0..count).map(|_| {
            n += 1;
            audit_record(n, n as i64)
        }));
        store
            .commit_governed(Lsn(0x100 + i as u64), &[], &delta)
            .unwrap();
    }
    let all = store.audit_query(&audit::AuditFilter::default()).unwrap();
    assert_eq!(
        all.iter().map(|r| r.version).collect::<Vec<_>>(),
        (1..=2_541).collect::<Vec<_>>()
    );
    let key3 = store
        .audit_query(&audit::AuditFilter {
            key: Some("3".into()),
            limit: Some(2),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        key3.iter().map(|r| r.version).collect::<Vec<_>>(),
        [2_530, 2_537]
    );
    // A time window: at or after `since`, before `until`, the newest `limit`.
    let window = store
        .audit_query(&audit::AuditFilter {
            since_micros: Some(100),
            until_micros: Some(200),
            limit: Some(3),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        window.iter().map(|r| r.version).collect::<Vec<_>>(),
        [197, 198, 199]
    );
    let none = store
        .audit_query(&audit::AuditFilter {
            limit: Some(0),
            ..Default::default()
        })
        .unwrap();
    assert!(none.is_empty());
    drop(store);
    // Reopened, the sequence carries on after the last chunk.
    let store = Store::open(&path).unwrap();
    store
        .commit_governed(Lsn(0x200), &[], &audit_delta([audit_record(9_999, 9_999)]))
        .unwrap();
    let all = store.audit_query(&audit::AuditFilter::default()).unwrap();
    assert_eq!(all.len(), 2_542);
    assert_eq!(all.last().unwrap().version, 9_999);
}

#[test]
fn audit_prune_drops_whole_old_chunks_only() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    // Three commits: times 1..=10, 11..=20, 21..=30.
    for c in 0..3u64 {
        let delta = audit_delta((1..=10).map(|i| audit_record(c * 10 + i, (c * 10 + i) as i64)));
        store.commit_governed(Lsn(0x100 + c), &[], &delta).unwrap();
    }
    // Everything before 15: the first commit's chunk goes; the second holds
    // records at 15 and later, so it stays whole.
    assert_eq!(store.audit_prune(15).unwrap(), 10);
    let left = store.audit_query(&audit::AuditFilter::default()).unwrap();
    assert_eq!(left.first().unwrap().time_micros, 11);
    assert_eq!(left.len(), 20);
    assert_eq!(store.audit_prune(i64::MAX).unwrap(), 20);
    assert!(store
        .audit_query(&audit::AuditFilter::default())
        .unwrap()
        .is_empty());
}

fn published_delta(changes: &[(&str, Option<u8>)], generation: u64) -> governance::GovDelta {
    let mut delta = governance::GovDelta {
        generation,
        ..Default::default()
    };
    for &(key, hash) in changes {
        steward_core::state::push_published_change(
            &mut delta.published,
            "wms",
            "product",
            key,
            hash.map(|h| [h; 16]),
        );
    }
    delta
}

fn all_published_keys(store: &Store, page: usize) -> Vec<String> {
    let mut keys = Vec::new();
    loop {
        let next = store
            .published_keys("wms", "product", keys.last().map(String::as_str), page)
            .unwrap();
        if next.is_empty() {
            return keys;
        }
        keys.extend(next);
    }
}

#[test]
fn published_hashes_apply_in_order_list_in_key_order_and_survive_reopen() {
    let (_dir, path) = temp();
    {
        let store = Store::open(&path).unwrap();
        // Set, overwrite, remove and set again, across commits and within
        // one; withheld (all zeros) is kept and not listed as sent.
        store
            .commit_governed(
                Lsn(0x100),
                &[],
                &published_delta(&[("10", Some(1)), ("9", Some(2)), ("b", Some(3))], 1),
            )
            .unwrap();
        store
            .commit_governed(
                Lsn(0x200),
                &[],
                &published_delta(
                    &[
                        ("9", None),
                        ("10", Some(4)),
                        ("9", Some(5)),
                        ("a", Some(0)),
                        ("007", Some(6)),
                        ("b", None),
                    ],
                    2,
                ),
            )
            .unwrap();
        // Another target's and entity's keys are not listed.
        let mut other = governance::GovDelta::default();
        steward_core::state::push_published_change(
            &mut other.published,
            "mes",
            "product",
            "1",
            Some([9; 16]),
        );
        steward_core::state::push_published_change(
            &mut other.published,
            "wms",
            "productx",
            "1",
            Some([9; 16]),
        );
        store.commit_governed(Lsn(0x300), &[], &other).unwrap();
    }
    let store = Store::open(&path).unwrap();
    // Numbers in numeric order, then other keys by their bytes.
    assert_eq!(all_published_keys(&store, 1), ["9", "10", "007"]);
    assert_eq!(all_published_keys(&store, 100), ["9", "10", "007"]);
    assert_eq!(store.published_entries().unwrap(), 6);
    let mut reader = store.state_reader();
    reader.refresh();
    assert_eq!(reader.get("wms", "product", "10"), Some([4; 16]));
    assert_eq!(reader.get("wms", "product", "9"), Some([5; 16]));
    assert_eq!(reader.get("wms", "product", "a"), Some([0; 16]));
    assert_eq!(reader.get("wms", "product", "b"), None);
    assert_eq!(reader.get("wms", "product", "7"), None, "007 is not 7");
    assert_eq!(reader.get("mes", "product", "1"), Some([9; 16]));
    assert_eq!(reader.error(), None);
}

const MODEL_TARGETS: [&str; 2] = ["wms", "mes"];
const MODEL_ENTITIES: [&str; 2] = ["product", "partner"];
const MODEL_KEYS: [&str; 12] = [
    "0", "1", "2", "5", "9", "10", "11", "100", "007", "a", "b", "zz",
];

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
    /// Whether a key is updated in place, new below a (target, entity)'s
    /// greatest key, or appended past it, spliced in a run: the table ends
    /// as a map applying every change in order says.
    #[test]
    fn published_changes_end_as_applying_them_in_order_says(
        deltas in proptest::collection::vec(
            proptest::collection::vec(
                (0..2usize, 0..2usize, 0..12usize, proptest::option::of(0..4u8)),
                0..40,
            ),
            1..6,
        )
    ) {
        let (_dir, path) = temp();
        let store = Store::open(&path).unwrap();
        let mut model = std::collections::HashMap::new();
        for (i, changes) in deltas.iter().enumerate() {
            let mut delta = governance::GovDelta {
                generation: i as u64 + 1,
                ..Default::default()
            };
            for &(t, e, k, hash) in changes {
                let name = (MODEL_TARGETS[t], MODEL_ENTITIES[e], MODEL_KEYS[k]);
                let hash = hash.map(|h| [h; 16]);
                steward_core::state::push_published_change(
                    &mut delta.published, name.0, name.1, name.2, hash,
                );
                match hash {
                    Some(hash) => model.insert(name, hash),
                    None => model.remove(&name),
                };
            }
            store.commit_governed(Lsn(0x100 + i as u64), &[], &delta).unwrap();
        }
        let mut reader = store.state_reader();
        reader.refresh();
        for t in MODEL_TARGETS {
            for e in MODEL_ENTITIES {
                for k in MODEL_KEYS {
                    proptest::prop_assert_eq!(
                        reader.get(t, e, k),
                        model.get(&(t, e, k)).copied(),
                        "{} {} {}", t, e, k
                    );
                }
            }
        }
        proptest::prop_assert_eq!(reader.error(), None);
        proptest::prop_assert_eq!(store.published_entries().unwrap(), model.len() as u64);
    }
}

#[test]
fn published_integer_keys_list_one_range_of_numbers_only() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    // 0 (withheld), numbers across a byte boundary, the largest u64, and
    // keys that are not canonical numbers.
    let keys: Vec<(&str, Option<u8>)> = vec![
        ("0", Some(0)),
        ("1", Some(1)),
        ("255", Some(1)),
        ("256", Some(1)),
        ("1000", Some(1)),
        ("18446744073709551615", Some(1)),
        ("007", Some(1)),
        ("-5", Some(1)),
        ("x", Some(1)),
    ];
    store
        .commit_governed(Lsn(0x100), &[], &published_delta(&keys, 1))
        .unwrap();
    let mut other = governance::GovDelta::default();
    steward_core::state::push_published_change(
        &mut other.published,
        "wms",
        "productx",
        "2",
        Some([9; 16]),
    );
    store.commit_governed(Lsn(0x200), &[], &other).unwrap();
    let between = |after, through, max| {
        store
            .published_integer_keys("wms", "product", after, through, max)
            .unwrap()
    };
    assert_eq!(between(None, u64::MAX, 100), [1, 255, 256, 1000, u64::MAX]);
    assert_eq!(
        between(None, 256, 100),
        [1, 255, 256],
        "through is included"
    );
    assert_eq!(
        between(Some(1), 1000, 100),
        [255, 256, 1000],
        "after is not"
    );
    assert_eq!(between(Some(255), 999, 100), [256]);
    assert_eq!(between(None, u64::MAX, 2), [1, 255], "at most max");
    assert_eq!(between(Some(1000), 1000, 100), Vec::<u64>::new());
    assert_eq!(between(Some(u64::MAX), u64::MAX, 100), Vec::<u64>::new());
    assert_eq!(between(Some(2000), 10, 100), Vec::<u64>::new());
}

#[test]
fn the_reader_sees_a_generation_once_it_is_committed() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    let mut reader = store.state_reader();
    assert_eq!(reader.refresh(), 0);
    let g1 = reader.next_generation();
    let g2 = reader.next_generation();
    assert!(g2 > g1 && g1 > 0);
    assert_eq!(reader.get("wms", "product", "1"), None);
    store
        .commit_governed(Lsn(0x100), &[], &published_delta(&[("1", Some(1))], g1))
        .unwrap();
    // Not before a refresh: the governance still holds the change itself.
    assert_eq!(reader.get("wms", "product", "1"), None);
    assert_eq!(reader.refresh(), g1);
    assert_eq!(reader.get("wms", "product", "1"), Some([1; 16]));
    // Released while idle: the next read opens a transaction again.
    reader.release();
    assert_eq!(reader.get("wms", "product", "1"), Some([1; 16]));
    assert_eq!(reader.refresh(), g1);
    assert_eq!(reader.get("wms", "product", "1"), Some([1; 16]));
    // A target never sent the entity reads as nothing, and as sent once a
    // generation that sends it is committed and seen.
    assert_eq!(reader.get("mes", "product", "1"), None);
    let mut mes = governance::GovDelta {
        generation: g2,
        ..Default::default()
    };
    for key in ["1", "5"] {
        steward_core::state::push_published_change(
            &mut mes.published,
            "mes",
            "product",
            key,
            Some([2; 16]),
        );
    }
    store.commit_governed(Lsn(0x200), &[], &mes).unwrap();
    assert_eq!(reader.get("mes", "product", "1"), None);
    assert_eq!(reader.refresh(), g2);
    // Keys below, at, between and above the greatest one sent.
    assert_eq!(reader.get("mes", "product", "0"), None);
    assert_eq!(reader.get("mes", "product", "1"), Some([2; 16]));
    assert_eq!(reader.get("mes", "product", "3"), None);
    assert_eq!(reader.get("mes", "product", "5"), Some([2; 16]));
    assert_eq!(reader.get("mes", "product", "6"), None);
    assert_eq!(reader.get("mes", "product", "a"), None);
    assert_eq!(reader.get("wms", "product", "1"), Some([1; 16]));
    assert_eq!(reader.error(), None);
    // Another handle of the same file hands out later generations.
    let mut second = store.state_reader();
    assert!(second.next_generation() > g2);
}

#[test]
fn a_legacy_published_log_moves_into_the_table() {
    let (_dir, path) = temp();
    let digest = |k: &str| published::published_digest("wms", "product", k);
    {
        let store = Store::open(&path).unwrap();
        store
            .write(redb::Durability::Immediate, |txn| {
                published::write_legacy(
                    txn,
                    &[
                        (digest("1"), Some([1; 16])),
                        (digest("2"), Some([2; 16])),
                        (digest("3"), Some([0; 16])),
                        (digest("2"), None),
                        (digest("4"), Some([4; 16])),
                        (digest("1"), Some([5; 16])),
                    ],
                    &[
                        ["wms", "product", "1"],
                        ["wms", "product", "2"],
                        ["wms", "product", "4"],
                        ["wms", "product", "1"],
                    ],
                )
                .map_err(|e| TxnError::Redb(Box::new(e)))
            })
            .unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(all_published_keys(&store, 10), ["1", "4"]);
    let mut reader = store.state_reader();
    reader.refresh();
    assert_eq!(reader.get("wms", "product", "1"), Some([5; 16]));
    assert_eq!(reader.get("wms", "product", "2"), None);
    assert_eq!(reader.get("wms", "product", "4"), Some([4; 16]));
    drop(reader);
    drop(store);
    // Moved once: opening again changes nothing.
    let store = Store::open(&path).unwrap();
    assert_eq!(all_published_keys(&store, 10), ["1", "4"]);
    assert_eq!(store.published_entries().unwrap(), 2);
}

fn unique_op(value: &str, holder: Option<&str>) -> governance::GovOp {
    governance::GovOp::Unique {
        entity: "product".into(),
        field: "sku".into(),
        value: value.into(),
        holder: holder.map(str::to_string),
    }
}

#[test]
fn business_keys_are_read_both_ways_and_indexed_in_older_files() {
    let (_dir, path) = temp();
    let commit = |store: &Store, lsn, ops| {
        let delta = governance::GovDelta {
            ops,
            ..Default::default()
        };
        store.commit_governed(Lsn(lsn), &[], &delta).unwrap();
    };
    {
        let store = Store::open(&path).unwrap();
        commit(
            &store,
            0x100,
            vec![
                unique_op("a_1", Some("1")),
                unique_op("a_2", Some("1")),
                unique_op("b_1", Some("2")),
                unique_op("c_1", Some("12")),
            ],
        );
        // "a_2" passes to record 2, "c_1" is let go.
        commit(
            &store,
            0x200,
            vec![unique_op("a_2", Some("2")), unique_op("c_1", None)],
        );
        let mut reader = store.state_reader();
        reader.refresh();
        let claims = |key| {
            let mut c = reader.claims("product", key);
            c.sort();
            c
        };
        let sku = |v: &str| ("sku".to_string(), v.to_string());
        assert_eq!(claims("1"), vec![sku("a_1")]);
        assert_eq!(claims("2"), vec![sku("a_2"), sku("b_1")]);
        assert_eq!(claims("12"), vec![], "not mixed up with record 1's");
        assert_eq!(
            reader.unique_holder("product", "sku", "a_2").as_deref(),
            Some("2")
        );
        assert_eq!(reader.unique_holder("product", "sku", "c_1"), None);
        assert_eq!(reader.error(), None);
        drop(reader);
        // As a file written before the claims were indexed.
        store
            .write(redb::Durability::Immediate, |txn| {
                txn.delete_table(governance::GOV_CLAIMS)?;
                Ok(())
            })
            .unwrap();
    }
    let store = Store::open(&path).unwrap();
    let reader = store.state_reader();
    let mut claims = reader.claims("product", "2");
    claims.sort();
    assert_eq!(
        claims,
        vec![
            ("sku".to_string(), "a_2".to_string()),
            ("sku".to_string(), "b_1".to_string())
        ]
    );
    assert_eq!(reader.claims("product", "1").len(), 1);
}

#[test]
fn the_reference_index_is_rebuilt_from_the_rows_when_its_columns_change() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    let row = |key: &str, uom: u32| governance::GovOp::Row {
        entity: "product".into(),
        key: key.into(),
        row: Some(format!(r#"{{"id":{key},"uom_id":{uom},"categ_id":7}}"#).into_bytes()),
    };
    // More rows than one rebuild transaction reads.
    let ops: Vec<_> = (0..45_000u32).map(|i| row(&i.to_string(), i % 3)).collect();
    let delta = governance::GovDelta {
        ops,
        ..Default::default()
    };
    store.commit_governed(Lsn(0x100), &[], &delta).unwrap();
    let entries = |column: &'static str| {
        move |_: &str, bytes: &[u8]| -> Vec<(String, String)> {
            let row: serde_json::Value = serde_json::from_slice(bytes).unwrap();
            vec![(column.to_string(), row[column].to_string())]
        }
    };
    let uom = vec![("product".to_string(), "uom_id".to_string())];
    assert_eq!(
        store.ensure_ref_index(&uom, &entries("uom_id")).unwrap(),
        Some(45_000)
    );
    assert_eq!(
        store.ensure_ref_index(&uom, &entries("uom_id")).unwrap(),
        None,
        "covered"
    );
    let reader = store.state_reader();
    let mut keys = reader.referencing("product", "uom_id", "2");
    assert_eq!(keys.len(), 15_000);
    keys.sort_by_key(|k| k.parse::<u32>().unwrap());
    assert_eq!(&keys[..2], ["2", "5"]);
    drop(reader);
    // Another column: the old entries go, the new ones come.
    let categ = vec![("product".to_string(), "categ_id".to_string())];
    assert_eq!(
        store
            .ensure_ref_index(&categ, &entries("categ_id"))
            .unwrap(),
        Some(45_000)
    );
    let reader = store.state_reader();
    assert!(reader.referencing("product", "uom_id", "2").is_empty());
    assert_eq!(reader.referencing("product", "categ_id", "7").len(), 45_000);
}

#[test]
fn a_governance_summary_is_read_back_only_while_the_state_is_unchanged() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    assert_eq!(store.governance_summary().unwrap(), None);
    let change = |lsn| {
        let delta = governance::GovDelta {
            ops: vec![unique_op("a_1", Some("1"))],
            ..Default::default()
        };
        store.commit_governed(Lsn(lsn), &[], &delta).unwrap();
    };
    change(0x100);
    store.save_governance_summary(b"counts").unwrap();
    assert_eq!(
        store.governance_summary().unwrap().as_deref(),
        Some(&b"counts"[..])
    );
    // A commit without governance changes leaves it standing.
    store
        .commit_governed(Lsn(0x180), &[], &governance::GovDelta::default())
        .unwrap();
    drop(store);
    let store = Store::open(&path).unwrap();
    assert_eq!(
        store.governance_summary().unwrap().as_deref(),
        Some(&b"counts"[..])
    );
    let delta = governance::GovDelta {
        ops: vec![unique_op("a_2", Some("2"))],
        ..Default::default()
    };
    store.commit_governed(Lsn(0x200), &[], &delta).unwrap();
    assert_eq!(store.governance_summary().unwrap(), None, "out of date");
}

/// A state file with a few thousand events across several commits.
fn written_state() -> (tempfile::TempDir, PathBuf) {
    let (dir, path) = temp();
    let store = Store::open(&path).unwrap();
    for round in 0..20u64 {
        commit_n(&store, 10 + round, "wms", round * 100..(round + 1) * 100);
    }
    store.ack("wms", 500, 500).unwrap();
    drop(store);
    (dir, path)
}

/// Opening the damaged file fails as `Corrupted` naming the file, and
/// leaves every byte as it was.
fn assert_refused(path: &Path, damage: &str) {
    let before = std::fs::read(path).unwrap();
    let err = Store::open(path).expect_err(damage);
    assert!(
        matches!(err, StoreError::Corrupted { .. }),
        "{damage}: {err:?}"
    );
    assert!(err.is_damage());
    let text = err.to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("steward reset --all"), "{text}");
    assert!(!text.contains("writable"), "{text}");
    assert!(
        std::fs::read(path).unwrap() == before,
        "{damage}: the file changed"
    );
}

#[test]
fn an_empty_file_is_damage_not_a_new_state() {
    let (_dir, path) = temp();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, b"").unwrap();
    assert_refused(&path, "empty");
    assert!(Store::open(&path)
        .unwrap_err()
        .to_string()
        .contains("empty (0 bytes)"));
}

#[test]
fn cut_short_zeroed_and_flipped_files_are_refused_untouched() {
    let (_dir, path) = written_state();
    let original = std::fs::read(&path).unwrap();
    let len = original.len();
    assert!(len > 64 * 1024, "{len}");
    let damages: Vec<(&str, Vec<u8>)> = vec![
        ("cut to 4 KiB", original[..4096].to_vec()),
        ("cut to 100 bytes", original[..100].to_vec()),
        ("cut in half", original[..len / 2].to_vec()),
        ("header zeroed", {
            let mut b = original.clone();
            b[..512].fill(0);
            b
        }),
        ("data zeroed", {
            let mut b = original.clone();
            b[8192..len - 4096].fill(0);
            b
        }),
        ("a byte flipped in every page", {
            let mut b = original.clone();
            for page in (4096..len).step_by(4096) {
                b[page + 100] ^= 0xFF;
            }
            b
        }),
        ("sqlite", {
            let mut b = b"SQLite format 3\0".to_vec();
            b.resize(8192, 0);
            b
        }),
    ];
    for (damage, bytes) in damages {
        std::fs::write(&path, &bytes).unwrap();
        assert_refused(&path, damage);
    }
    std::fs::write(&path, &original).unwrap();
    let store = Store::open(&path).unwrap();
    assert_eq!(
        store.backlog("wms").unwrap(),
        1500,
        "the intact file still opens"
    );
}

#[test]
fn a_directory_as_state_path_is_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let err = Store::open(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::NotAFile { .. }), "{err:?}");
    assert!(err.to_string().contains("is not a file"), "{err}");
}

#[test]
fn a_new_state_file_is_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, path) = temp();
    drop(Store::open(&path).unwrap());
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(&dir.path().join("state")), 0o700);
}

#[test]
fn a_damaged_last_commit_is_refused_not_rolled_back() {
    let (_dir, path) = written_state();
    let mut bytes = std::fs::read(&path).unwrap();
    // redb's header: the god byte after the 9-byte signature says which of
    // the two 128-byte commit slots (at 64 and 192) is the latest.
    let primary = usize::from(bytes[9] & 1 != 0);
    bytes[64 + 128 * primary + 20] ^= 0xFF;
    std::fs::write(&path, &bytes).unwrap();
    assert_refused(&path, "latest commit slot damaged");
}

/// A `delivered` audit record for `event` at `target`.
fn delivered(event: &Event, target: &str) -> governance::AuditRecord {
    governance::AuditRecord {
        key: event.key.clone(),
        version: event.version,
        target: Some(target.into()),
        ..audit_record(0, 1)
    }
}

#[test]
fn delivered_audit_records_carry_the_outbox_seq_of_their_event() {
    use governance::GovernanceState;
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    commit_n(&store, 0x10, "wms", 1..4);
    let events: Vec<Event> = (10..14).map(sample).collect();
    // Event 11 was dropped from the appends (a snapshot's stale version),
    // and a record without an event sits between the others.
    let appends: Vec<(&str, &Event)> = vec![
        ("wms", &events[0]),
        ("erp", &events[0]),
        ("wms", &events[2]),
        ("wms", &events[3]),
    ];
    let mut suppressed = delivered(&events[2], "wms");
    suppressed.decision = "suppressed".into();
    let delta = audit_delta([
        delivered(&events[0], "wms"),
        delivered(&events[0], "erp"),
        delivered(&events[1], "wms"),
        suppressed,
        delivered(&events[2], "wms"),
        delivered(&events[3], "wms"),
    ]);
    store.commit_governed(Lsn(0x20), &appends, &delta).unwrap();
    let seqs: Vec<(String, String, Option<u64>)> = store
        .audit_query(&audit::AuditFilter::default())
        .unwrap()
        .into_iter()
        .map(|r| (r.target.unwrap(), r.key, r.seq))
        .collect();
    let row = |t: &str, k: &str, s: Option<u64>| (t.to_string(), k.to_string(), s);
    assert_eq!(
        seqs,
        vec![
            row("wms", "10", Some(4)),
            row("erp", "10", Some(1)),
            row("wms", "11", None),
            row("wms", "12", None),
            row("wms", "12", Some(5)),
            row("wms", "13", Some(6)),
        ]
    );
}

#[test]
fn acknowledgement_times_follow_the_cursor() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    commit_n(&store, 0x10, "wms", 1..6);
    assert_eq!(
        store.acknowledged_at("wms", 2).unwrap(),
        Acknowledged::No { cursor: 0 }
    );
    let before = chrono::Utc::now().timestamp_micros();
    store.ack("wms", 3, 3).unwrap();
    let after = chrono::Utc::now().timestamp_micros();
    let Acknowledged::At(at) = store.acknowledged_at("wms", 2).unwrap() else {
        panic!("seq 2 is acknowledged");
    };
    assert!((before..=after).contains(&at));
    assert_eq!(
        store.acknowledged_at("wms", 3).unwrap(),
        Acknowledged::At(at)
    );
    assert_eq!(
        store.acknowledged_at("wms", 4).unwrap(),
        Acknowledged::No { cursor: 3 }
    );
    // Another target's cursor is its own.
    assert_eq!(
        store.acknowledged_at("erp", 1).unwrap(),
        Acknowledged::No { cursor: 0 }
    );
    store.ack("wms", 5, 2).unwrap();
    let Acknowledged::At(later) = store.acknowledged_at("wms", 4).unwrap() else {
        panic!("seq 4 is acknowledged");
    };
    assert!(later >= at);
    // Within one second the second move replaced the first row: seq 2 now
    // reads the later time, never an earlier one than the truth.
    let first = store.acknowledged_at("wms", 2).unwrap();
    assert!(first == Acknowledged::At(at) || first == Acknowledged::At(later));
}

#[test]
fn pruned_acknowledgement_times_say_before() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    commit_n(&store, 0x10, "wms", 1..4);
    store.ack("wms", 1, 1).unwrap();
    // Rows of earlier seconds are kept apart; pruning is simulated by the floor.
    store
        .write(redb::Durability::Immediate, |txn| {
            txn.open_table(COUNTERS)?
                .insert(tables::ack_times_floor_key("wms").as_str(), 1)?;
            Ok(())
        })
        .unwrap();
    store.ack("wms", 3, 2).unwrap();
    assert!(matches!(
        store.acknowledged_at("wms", 1).unwrap(),
        Acknowledged::Before(Some(_))
    ));
    assert!(matches!(
        store.acknowledged_at("wms", 2).unwrap(),
        Acknowledged::At(_)
    ));
}

#[test]
fn a_reset_moves_the_cursor_without_acknowledging() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    commit_n(&store, 0x10, "wms", 1..5);
    store.ack("wms", 1, 1).unwrap();
    store
        .begin_resync("wms", &["product".to_string()], true)
        .unwrap();
    assert!(matches!(
        store.acknowledged_at("wms", 1).unwrap(),
        Acknowledged::At(_)
    ));
    assert_eq!(
        store.acknowledged_at("wms", 3).unwrap(),
        Acknowledged::Superseded,
        "dropped by the reset, never delivered"
    );
    // Later deliveries are noted as usual.
    commit_n(&store, 0x20, "wms", 10..12);
    store.ack("wms", 6, 2).unwrap();
    assert!(matches!(
        store.acknowledged_at("wms", 6).unwrap(),
        Acknowledged::At(_)
    ));
}

#[test]
fn a_snapshot_window_refuses_rows_older_than_a_streamed_event() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    let check = |key, version, record| snapshot_progress::VersionCheck {
        target: "wms",
        entity: "product",
        key,
        version,
        record,
    };
    // Nothing streamed yet: every read row is admitted, none recorded.
    assert_eq!(
        store
            .admit_versions(&[check("1", 5, false), check("2", 5, false)])
            .unwrap(),
        [true, true]
    );
    // A streamed event recorded, then in the same batch a read row of the
    // same key older than it: refused, another key's row admitted.
    assert_eq!(
        store
            .admit_versions(&[
                check("3", 10, true),
                check("3", 5, false),
                check("4", 5, false)
            ])
            .unwrap(),
        [true, false, true]
    );
    // Later batches see the recorded version; an older streamed event of a
    // key is refused too, a newer one admitted.
    assert_eq!(
        store
            .admit_versions(&[
                check("3", 9, false),
                check("3", 11, false),
                check("3", 8, true),
                check("1", 4, false)
            ])
            .unwrap(),
        [false, true, false, true]
    );
    // Read rows only (no write): checked against what was recorded.
    assert_eq!(
        store
            .admit_versions(&[
                check("3", 9, false),
                check("3", 10, false),
                check("5", 1, false)
            ])
            .unwrap(),
        [false, true, true]
    );
}
