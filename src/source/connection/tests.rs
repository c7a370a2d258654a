//! Unit tests of `source::connection`.

use super::*;

#[test]
fn versions_and_durations() {
    assert_eq!(
        parse_server_version("15.4 (Debian 15.4-1.pgdg120+1)"),
        Some(150004)
    );
    assert_eq!(parse_server_version("16beta1"), Some(160000));
    assert_eq!(parse_server_version("9.6.3"), Some(90603));
    assert_eq!(parse_pg_duration("2s"), Some(Duration::from_secs(2)));
    assert_eq!(parse_pg_duration("1min"), Some(Duration::from_secs(60)));
    assert_eq!(parse_pg_duration("0"), Some(Duration::ZERO));
    assert_eq!(status_interval(Duration::ZERO), Duration::from_secs(10));
    assert_eq!(
        status_interval(Duration::from_secs(60)),
        Duration::from_secs(10)
    );
    assert_eq!(
        status_interval(Duration::from_secs(3)),
        Duration::from_secs(1)
    );
    assert_eq!(silence_limit(Duration::ZERO), None);
    assert_eq!(
        silence_limit(Duration::from_secs(60)),
        Some(Duration::from_secs(120))
    );
}
