//! Unit tests of `visibility::replicas`.

use super::*;

fn state(up: bool, replay: Option<u64>) -> ReplicaState {
    ReplicaState {
        name: "r".into(),
        up,
        down_reason: (!up).then(|| "connection refused".into()),
        replay: replay.map(Lsn),
        lag_seconds: None,
        lagging_until: None,
    }
}

#[test]
fn replicas_that_replayed_the_batch_do_not_block() {
    let now = Instant::now();
    let later = now + Duration::from_secs(1);
    assert_eq!(decide(&[], Lsn(10), now, later), Decision::Apply);
    let states = [state(true, Some(10)), state(true, Some(11))];
    assert_eq!(decide(&states, Lsn(10), now, later), Decision::Apply);
    let states = [state(true, Some(9)), state(true, Some(11))];
    assert_eq!(
        decide(&states, Lsn(10), now, later),
        Decision::Wait(vec![0])
    );
    // Up but not polled yet: wait for its first answer.
    let states = [state(true, None)];
    assert_eq!(
        decide(&states, Lsn(10), now, later),
        Decision::Wait(vec![0])
    );
}

#[test]
fn a_replica_not_polled_yet_is_waited_for_until_its_first_answer() {
    let now = Instant::now();
    let fresh = ReplicaState::new("r".into());
    assert_eq!(
        decide(
            std::slice::from_ref(&fresh),
            Lsn(10),
            now,
            now + Duration::from_secs(1)
        ),
        Decision::Wait(vec![0])
    );
    assert_eq!(
        decide(&[fresh], Lsn(10), now, now),
        Decision::TimedOut(vec![0])
    );
}

#[test]
fn down_replicas_never_block() {
    let now = Instant::now();
    let states = [state(false, Some(1)), state(false, None)];
    assert_eq!(
        decide(&states, Lsn(10), now, now + Duration::from_secs(1)),
        Decision::Apply
    );
    assert_eq!(
        applied_ahead(&states, Lsn(10)),
        vec![0, 1],
        "down and behind: re-applied once it is back and replayed the batch"
    );
    let back = [state(false, Some(12))];
    assert!(
        applied_ahead(&back, Lsn(10)).is_empty(),
        "down but it had replayed it"
    );
}

#[test]
fn queued_batches_merge_into_segments() {
    let plan = |key: &str| {
        let mut p = Plan::default();
        p.keys.extend([key]);
        p
    };
    let mut held = VecDeque::new();
    push_merged(&mut held, (Lsn(10), plan("a")));
    push_merged(&mut held, (Lsn(20), plan("b")));
    assert_eq!(held.len(), 1, "small batches share a segment");
    assert_eq!(
        held[0].0,
        Lsn(20),
        "applied once the later batch is replayed"
    );
    assert_eq!(held[0].1.ops(), 2);
    let mut big = Plan::default();
    big.keys
        .extend((0..REAPPLY_SEGMENT_OPS).map(|i| format!("k{i}")));
    push_merged(&mut held, (Lsn(30), big));
    push_merged(&mut held, (Lsn(40), plan("c")));
    push_merged(&mut held, (Lsn(50), plan("d")));
    assert_eq!(held.len(), 2, "a full segment starts the next one");
    assert_eq!(held[1].0, Lsn(50));
    assert_eq!(held[1].1.ops(), 2);
}

#[test]
fn the_deadline_applies_and_names_the_late_replicas() {
    let now = Instant::now();
    let states = [
        state(true, Some(9)),
        state(true, Some(20)),
        state(true, Some(5)),
    ];
    assert_eq!(
        decide(&states, Lsn(10), now, now),
        Decision::TimedOut(vec![0, 2])
    );
    assert_eq!(applied_ahead(&states, Lsn(10)), vec![0, 2]);
}

#[test]
fn a_lagging_replica_is_not_waited_for_until_it_caught_up() {
    let now = Instant::now();
    let later = now + Duration::from_secs(1);
    let mut s = state(true, Some(5));
    s.lagging_until = Some(Lsn(10));
    // Behind the position it timed out on: later batches go ahead of it...
    assert_eq!(decide(&[s.clone()], Lsn(12), now, later), Decision::Apply);
    // ...and are re-applied for it.
    assert_eq!(applied_ahead(&[s.clone()], Lsn(12)), vec![0]);
    // Once it replayed that position, it is waited for again.
    s.replay = Some(Lsn(10));
    assert_eq!(decide(&[s], Lsn(12), now, later), Decision::Wait(vec![0]));
}
