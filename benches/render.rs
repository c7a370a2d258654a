//! Criterion micro-benchmark of template rendering and planning: a
//! `Planner` fed a decoded transaction of 10,000 UPDATEs of `items` (keys
//! `item:{id}` and `owner:{owner_id}:items`) and of `users` (a key, a tag and
//! a version), taking the plan every `max_batch_ops`; throughput in changes/s.

use std::hint::black_box;
use std::sync::Arc;

use cache_invalidator::decode::relations::RelationCache;
use cache_invalidator::decode::Event;
use cache_invalidator::map::Mappings;
use cache_invalidator::plan::{Planner, PlannerContext};
use cache_invalidator::Lsn;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

#[path = "support/pgoutput_gen.rs"]
mod pgoutput_gen;

const ROWS: u64 = 10_000;

fn events(table: &str) -> Vec<Event> {
    let mut cache = RelationCache::new();
    let mut out = Vec::new();
    for (lsn, payload) in pgoutput_gen::items_transaction(table, ROWS) {
        cache
            .decode_payload(&payload, Lsn(lsn), &mut out)
            .expect("decodes");
    }
    out
}

fn bench(c: &mut Criterion, name: &str, mappings: &str, events: &[Event]) {
    let mappings = Arc::new(Mappings::parse("bench.toml", mappings).expect("mappings"));
    let ctx = PlannerContext::default();
    let max_ops = ctx.max_batch_ops;
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Elements(ROWS));
    g.bench_function("changes", |b| {
        b.iter(|| {
            let mut planner = Planner::new(Arc::clone(&mappings), ctx.clone());
            for e in events {
                planner.feed(black_box(e));
                if planner.plan().ops() >= max_ops {
                    black_box(planner.take());
                }
            }
            black_box(planner.take());
        })
    });
    g.finish();
}

fn render(c: &mut Criterion) {
    bench(
        c,
        "plan/items_keys",
        r#"
        [[table]]
        name = "items"
        keys = ["item:{id}", "owner:{owner_id}:items"]
        assume_unchanged = ["owner_id"]
        "#,
        &events("items"),
    );
    bench(
        c,
        "plan/users_key_tag_version",
        r#"
        [[table]]
        name = "users"
        keys = ["user:{id}:profile"]
        tags = ["user:{id}"]
        versions = ["user:{id}"]
        "#,
        &events("users"),
    );
}

criterion_group!(benches, render);
criterion_main!(benches);
