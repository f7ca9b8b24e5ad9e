//! Messages/s through the pgoutput decoder: Odoo-like product updates
//! (12 columns, text format) and inserts, framed exactly as PostgreSQL sends
//! them. Run with `cargo bench --bench decoder`.

use std::hint::black_box;

use bytes::{BufMut, Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use steward_postgres::pgoutput::decode;

const MESSAGES: usize = 3000;

/// An Insert ('I') or Update ('U', new tuple only, as with REPLICA IDENTITY DEFAULT).
fn row_message(tag: u8, i: usize) -> Bytes {
    let values: Vec<String> = vec![
        format!("{}", 100_000 + i),
        format!("SKU-{i:06}"),
        format!("{{\"en_US\": \"Item {i}\", \"de_DE\": \"Teil {i}\"}}"),
        format!("DE{i:09}"),
        format!("{}.{:02}", i % 1000, i % 100),
        "t".into(),
        "approved".into(),
        "2024-05-01 12:00:00.123456".into(),
        "2".into(),
        "2".into(),
        "a longer description of the item that nobody maps".into(),
        "1.5".into(),
    ];
    let mut b = BytesMut::new();
    b.put_u8(tag);
    b.put_u32(16_384);
    b.put_u8(b'N');
    b.put_u16(values.len() as u16 + 2);
    for v in &values {
        b.put_u8(b't');
        b.put_u32(v.len() as u32);
        b.put_slice(v.as_bytes());
    }
    // A null and an unchanged TOAST value, as Odoo rows often carry.
    b.put_u8(b'n');
    b.put_u8(b'u');
    b.freeze()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("pgoutput_decode");
    group.throughput(Throughput::Elements(MESSAGES as u64));
    for (name, tag) in [("update", b'U'), ("insert", b'I')] {
        let messages: Vec<Bytes> = (0..MESSAGES).map(|i| row_message(tag, i)).collect();
        // A malformed stream would make the benchmark measure error paths.
        assert!(messages.iter().all(|m| decode(m, false).is_ok()));
        group.bench_function(name, |b| {
            b.iter(|| {
                for m in &messages {
                    black_box(decode(black_box(m), false).ok());
                }
            });
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
