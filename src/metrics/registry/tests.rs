//! Unit tests of the exposition: names, values, labels, series created at 0.

use super::*;

fn lines_with<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    text.lines().filter(|l| l.starts_with(prefix)).collect()
}

#[test]
fn exposition_after_a_known_sequence_has_exact_values_and_labels() {
    let m = Metrics::new();
    m.transaction(3);
    m.transaction(1);
    m.change("public.users", Op::Update);
    m.change("public.users", Op::Update);
    m.change("public.users", Op::Delete);
    m.change("public.posts", Op::Insert);
    m.invalidations(InvalidationKind::Keys, 7);
    m.invalidations(InvalidationKind::Tags, 2);
    m.invalidations(InvalidationKind::Keys, 1);
    m.refreshes(RefreshOutcome::Set, 5);
    m.refreshes(RefreshOutcome::Kept, 2);
    m.refreshes(RefreshOutcome::Set, 1);
    m.fallback("public.users", "unknown_value", 1);
    m.fallback("public.users", "unknown_value", 1);
    m.fallback("public.users", "missing_column", 1);
    m.flush(FlushReason::MarkerAll);
    m.redis_error("connection");
    m.redis_error("connection");
    m.redis_error("noperm");
    m.reconnect(Target::Redis);
    m.batch(3);
    m.batch(40);
    m.apply_latency(Duration::from_millis(2));
    m.confirmed(0x1_0000_0010, Some(4096));
    m.confirmed(0x1_0000_0020, None);
    m.heartbeat_lag(Duration::from_millis(250));
    m.set_role(Role::Active);
    m.set_renamed_tables(1);

    let t = m.render();
    let expect = [
        "cache_invalidator_transactions_total 4",
        r#"cache_invalidator_changes_total{table="public.users",op="update"} 2"#,
        r#"cache_invalidator_changes_total{table="public.users",op="delete"} 1"#,
        r#"cache_invalidator_changes_total{table="public.posts",op="insert"} 1"#,
        r#"cache_invalidator_invalidations_total{kind="keys"} 8"#,
        r#"cache_invalidator_invalidations_total{kind="tags"} 2"#,
        r#"cache_invalidator_invalidations_total{kind="versions"} 0"#,
        r#"cache_invalidator_invalidations_total{kind="patterns"} 0"#,
        r#"cache_invalidator_invalidations_total{kind="publish"} 0"#,
        r#"cache_invalidator_refreshes_total{outcome="set"} 6"#,
        r#"cache_invalidator_refreshes_total{outcome="kept"} 2"#,
        r#"cache_invalidator_refreshes_total{outcome="unlinked_fallback"} 0"#,
        r#"cache_invalidator_refreshes_total{outcome="too_large"} 0"#,
        r#"cache_invalidator_fallbacks_total{table="public.users",reason="unknown_value"} 2"#,
        r#"cache_invalidator_fallbacks_total{table="public.users",reason="missing_column"} 1"#,
        r#"cache_invalidator_flushes_total{reason="marker_all"} 1"#,
        r#"cache_invalidator_flushes_total{reason="marker_table"} 0"#,
        r#"cache_invalidator_redis_errors_total{kind="connection"} 2"#,
        r#"cache_invalidator_redis_errors_total{kind="noperm"} 1"#,
        r#"cache_invalidator_reconnects_total{target="redis"} 1"#,
        r#"cache_invalidator_reconnects_total{target="postgres"} 0"#,
        "cache_invalidator_batch_size_count 2",
        "cache_invalidator_batch_size_sum 43.0",
        r#"cache_invalidator_batch_size_bucket{le="5.0"} 1"#,
        r#"cache_invalidator_batch_size_bucket{le="50.0"} 2"#,
        "cache_invalidator_apply_latency_seconds_count 1",
        r#"cache_invalidator_apply_latency_seconds_bucket{le="0.001"} 0"#,
        r#"cache_invalidator_apply_latency_seconds_bucket{le="0.0025"} 1"#,
        r#"cache_invalidator_apply_latency_seconds_bucket{le="10.0"} 1"#,
        r#"cache_invalidator_apply_latency_seconds_bucket{le="+Inf"} 1"#,
        "cache_invalidator_confirmed_lsn 4294967328",
        "cache_invalidator_replication_lag_bytes 4096",
        "cache_invalidator_heartbeat_lag_seconds 0.25",
        r#"cache_invalidator_role{role="active"} 1"#,
        r#"cache_invalidator_role{role="standby"} 0"#,
        "cache_invalidator_renamed_tables 1",
        "cache_invalidator_blocked_seconds 0.0",
        "# TYPE cache_invalidator_transactions counter",
        "# TYPE cache_invalidator_apply_latency_seconds histogram",
        "# TYPE cache_invalidator_confirmed_lsn gauge",
    ];
    for line in expect {
        assert!(
            t.lines().any(|l| l == line),
            "missing line {line:?} in:\n{t}"
        );
    }
    assert!(t.ends_with("# EOF\n"), "{t}");
    // Lazily created label sets only exist once used.
    assert_eq!(
        lines_with(&t, "cache_invalidator_changes_total{").len(),
        3,
        "{t}"
    );
    assert_eq!(
        lines_with(&t, "cache_invalidator_fallbacks_total{").len(),
        2,
        "{t}"
    );
}

#[test]
fn every_metric_name_is_exposed() {
    let m = Metrics::new();
    m.change("t", Op::Insert);
    m.fallback("t", "unknown_value", 1);
    m.redis_error("oom");
    m.visibility_wait(Duration::from_millis(2));
    m.replica_up("10.0.0.2:5432", true);
    m.replica_lag("10.0.0.2:5432", 10, 0.5);
    m.replica_wait("10.0.0.2:5432");
    m.replica_timeout("10.0.0.2:5432");
    m.replica_reapplied("10.0.0.2:5432");
    let t = m.render();
    use names::*;
    for name in [
        REPLICATION_LAG_BYTES,
        CONFIRMED_LSN,
        TRANSACTIONS_TOTAL,
        CHANGES_TOTAL,
        INVALIDATIONS_TOTAL,
        REFRESHES_TOTAL,
        FALLBACKS_TOTAL,
        FLUSHES_TOTAL,
        REDIS_ERRORS_TOTAL,
        BLOCKED_SECONDS,
        RECONNECTS_TOTAL,
        BATCH_SIZE,
        APPLY_LATENCY_SECONDS,
        HEARTBEAT_LAG_SECONDS,
        ROLE,
        RENAMED_TABLES,
        VISIBILITY_WAIT_SECONDS,
        VISIBILITY_WAITING,
        REPLICA_UP,
        REPLICA_LAG_BYTES,
        REPLICA_LAG_SECONDS,
        REPLICA_WAITS_TOTAL,
        REPLICA_TIMEOUTS_TOTAL,
        REPLICA_REAPPLIES_TOTAL,
    ] {
        assert!(name.starts_with("cache_invalidator_"));
        assert!(
            t.lines()
                .any(|l| !l.starts_with('#') && l.starts_with(name)),
            "{name} not exposed:\n{t}"
        );
    }
}

#[test]
fn role_switches_both_gauges() {
    let m = Metrics::new();
    let t = m.render();
    // Unknown role until the worker says: neither is 1.
    assert!(
        t.contains("cache_invalidator_role{role=\"active\"} 0\n"),
        "{t}"
    );
    m.set_role(Role::Standby);
    m.set_role(Role::Active);
    m.set_role(Role::Standby);
    let t = m.render();
    assert!(
        t.contains("cache_invalidator_role{role=\"active\"} 0\n"),
        "{t}"
    );
    assert!(
        t.contains("cache_invalidator_role{role=\"standby\"} 1\n"),
        "{t}"
    );
}

#[test]
fn blocked_seconds_grows_while_blocked_and_resets() {
    let m = Metrics::new();
    m.set_blocked(Some(Instant::now() - Duration::from_secs(90)));
    let t = m.render();
    let line = lines_with(&t, "cache_invalidator_blocked_seconds ")[0];
    let v: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((90.0..100.0).contains(&v), "{line}");
    m.set_blocked(None);
    assert!(m
        .render()
        .contains("cache_invalidator_blocked_seconds 0.0\n"));
}

#[test]
fn label_values_are_escaped() {
    let m = Metrics::new();
    m.change("public.\"we\\ird\"", Op::Insert);
    let t = m.render();
    assert!(
        t.contains(r#"cache_invalidator_changes_total{table="public.\"we\\ird\"",op="insert"} 1"#),
        "{t}"
    );
}

#[test]
fn confirmed_lsn_is_exact_beyond_f64_precision() {
    let m = Metrics::new();
    m.confirmed(u64::MAX - 1, Some(0));
    assert!(m.render().contains(&format!(
        "cache_invalidator_confirmed_lsn {}\n",
        u64::MAX - 1
    )));
}

#[test]
fn counter_registration_names_drop_total() {
    assert_eq!(
        counter_name(names::TRANSACTIONS_TOTAL),
        "cache_invalidator_transactions"
    );
    assert_eq!(counter_name(names::ROLE), names::ROLE);
}

#[test]
fn known_label_values_start_at_zero() {
    let m = Metrics::new();
    m.start_at_zero(
        &["public.users".to_string()],
        &["unknown_value", "missing_column"],
        &["connection", "noperm"],
    );
    let t = m.render();
    for line in [
        r#"cache_invalidator_changes_total{table="public.users",op="insert"} 0"#,
        r#"cache_invalidator_changes_total{table="public.users",op="truncate"} 0"#,
        r#"cache_invalidator_fallbacks_total{table="public.users",reason="missing_column"} 0"#,
        r#"cache_invalidator_redis_errors_total{kind="noperm"} 0"#,
    ] {
        assert!(t.lines().any(|l| l == line), "missing {line:?} in:\n{t}");
    }
    assert_eq!(lines_with(&t, "cache_invalidator_changes_total{").len(), 4);
    // The first event counts on the series created at 0.
    m.change("public.users", Op::Insert);
    let t = m.render();
    assert!(
        t.contains(r#"cache_invalidator_changes_total{table="public.users",op="insert"} 1"#),
        "{t}"
    );
    assert_eq!(lines_with(&t, "cache_invalidator_changes_total{").len(), 4);
}
