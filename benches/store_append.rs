//! Durable commit of 1,000 events into the redb outbox, the store's hot path
//! (one fsync per commit). Run with `cargo bench --bench store_append`.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use steward_core::model::{Event, EventOp, Lsn};
use steward_store::Store;

fn events(n: u64) -> Vec<Event> {
    (0..n)
        .map(|i| Event {
            change: None,
            tx_id: None,
            id: Event::source_id(Lsn(0x1000 + i), i as u32),
            entity: "product".into(),
            key: i.to_string(),
            op: EventOp::Upsert,
            version: 0x1000 + i,
            time: "2024-05-01T12:00:00.000Z".into(),
            data: serde_json::json!({
                "id": i,
                "default_code": format!("SKU-{i:06}"),
                "name": format!("Product number {i}"),
                "list_price": "123.4500".parse::<serde_json::Number>().expect("a number"),
                "active": true,
                "categ_id": 12,
                "barcode": format!("{:013}", i * 7919),
            })
            .into(),
        })
        .collect()
}

fn store_append(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = Store::open(&dir.path().join("bench.redb")).expect("the store opens");
    let events = events(1000);
    let appends: Vec<(&str, &Event)> = events.iter().map(|e| ("wms", e)).collect();
    let mut lsn = 0u64;

    let mut group = c.benchmark_group("store");
    group.throughput(Throughput::Elements(appends.len() as u64));
    group.bench_function("commit_1000_events", |b| {
        b.iter_batched(
            || {
                // Keep the outbox from growing across iterations (not timed).
                store.ack("wms", u64::MAX, 0).expect("the ack succeeds");
                lsn += 1;
                Lsn(lsn)
            },
            |lsn| store.commit(lsn, &appends).expect("the commit succeeds"),
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

criterion_group!(benches, store_append);
criterion_main!(benches);
