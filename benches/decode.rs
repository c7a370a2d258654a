//! Criterion micro-benchmark of the pgoutput decoder on the worker's path
//! (`RelationCache::decode_shared`, events handed back with `recycle`) over
//! the captured fixtures and over a synthetic 10,000-row UPDATE transaction;
//! throughput in bytes/s and messages/s.

use std::hint::black_box;

use cache_invalidator::decode::relations::RelationCache;
use cache_invalidator::Lsn;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

#[path = "support/pgoutput_gen.rs"]
mod pgoutput_gen;

/// Every message of every captured fixture, as (lsn, payload).
fn fixtures() -> Vec<(Lsn, Vec<u8>)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pgoutput");
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .expect("fixtures")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "hex"))
        .collect();
    names.sort();
    let mut out = Vec::new();
    for path in names {
        let text = std::fs::read_to_string(&path).expect("fixture");
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        {
            let (lsn, hex) = line.split_once(' ').expect("<lsn> <hex>");
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
                .collect();
            out.push((lsn.parse().expect("lsn"), bytes));
        }
    }
    out
}

fn run(c: &mut Criterion, name: &str, stream: &[(Lsn, Vec<u8>)]) {
    let bytes: usize = stream.iter().map(|(_, p)| p.len()).sum();
    // The worker's payloads are slices of the socket's buffer.
    let stream: Vec<(Lsn, bytes::Bytes)> = stream
        .iter()
        .map(|(l, p)| (*l, bytes::Bytes::copy_from_slice(p)))
        .collect();
    let stream = stream.as_slice();
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("bytes", |b| bench_once(b, stream));
    g.throughput(Throughput::Elements(stream.len() as u64));
    g.bench_function("messages", |b| bench_once(b, stream));
    g.finish();
}

fn bench_once(b: &mut criterion::Bencher<'_>, stream: &[(Lsn, bytes::Bytes)]) {
    let mut events = Vec::with_capacity(4);
    b.iter(|| {
        let mut cache = RelationCache::new();
        for (lsn, payload) in stream {
            cache
                .decode_shared(black_box(payload), *lsn, &mut events)
                .expect("decodes");
            for event in events.drain(..) {
                cache.recycle(black_box(event));
            }
        }
    });
}

fn decode(c: &mut Criterion) {
    let fixtures = fixtures();
    assert!(!fixtures.is_empty(), "no fixtures");
    run(c, "decode/fixtures", &fixtures);
    let txn: Vec<(Lsn, Vec<u8>)> = pgoutput_gen::items_transaction("items", 10_000)
        .into_iter()
        .map(|(l, p)| (Lsn(l), p))
        .collect();
    run(c, "decode/items_update_10k", &txn);
}

criterion_group!(benches, decode);
criterion_main!(benches);
