//! Unit tests of `source::conninfo`.

use super::*;
use std::path::Path;

#[test]
fn parses_tcp_url_with_everything() {
    let s = ConnectionSettings::parse(
        "postgres://app:s%40cret@db.example:6543/shop?sslmode=disable&application_name=x",
        None,
    )
    .unwrap();
    assert_eq!(s.host, Host::Tcp("db.example".into()));
    assert_eq!(s.port, 6543);
    assert_eq!(s.user, "app");
    assert_eq!(s.password.as_deref(), Some("s@cret"));
    assert_eq!(s.dbname, "shop");
    assert_eq!(s.sslmode, SslMode::Disable);
    assert_eq!(s.application_name, "x");
    assert_eq!(s.target(), "db.example:6543");
}

#[test]
fn parses_unix_socket_url() {
    let s = ConnectionSettings::parse("postgres://postgres@/postgres?host=/tmp/x&port=5433", None)
        .unwrap();
    assert_eq!(s.host, Host::Unix("/tmp/x".into()));
    assert_eq!(
        s.socket_path().unwrap(),
        PathBuf::from("/tmp/x/.s.PGSQL.5433")
    );
    assert_eq!(s.application_name, DEFAULT_APPLICATION_NAME);
    let s = ConnectionSettings::parse("postgresql://%2Fvar%2Frun%2Fpg/db", None).unwrap();
    assert_eq!(s.host, Host::Unix("/var/run/pg".into()));
}

#[test]
fn parses_ipv6_and_keyword_value() {
    let s = ConnectionSettings::parse("postgres://u@[::1]:5000/d", None).unwrap();
    assert_eq!(s.host, Host::Tcp("::1".into()));
    assert_eq!(s.target(), "[::1]:5000");
    let s = ConnectionSettings::parse(
        "host=127.0.0.1 port=5001 user=u password='it''s \\'q\\'' dbname = d",
        None,
    );
    // '' is not an escape in conninfo: the value ends at the second quote.
    assert!(s.is_err());
    let s = ConnectionSettings::parse(
        "host=127.0.0.1 port=5001 user=u password='a \\'b' dbname = d",
        None,
    )
    .unwrap();
    assert_eq!(s.password.as_deref(), Some("a 'b"));
    assert_eq!(s.dbname, "d");
    assert_eq!(s.port, 5001);
}

#[test]
fn password_override_wins_and_is_never_printed() {
    let s = ConnectionSettings::parse("postgres://u:inurl@h/d", Some("fromfile".into())).unwrap();
    assert_eq!(s.password.as_deref(), Some("fromfile"));
    let shown = format!("{s} {s:?}");
    assert!(
        !shown.contains("fromfile") && !shown.contains("inurl"),
        "{shown}"
    );
    assert_eq!(s.to_string(), "postgres://u:***@h:5432/d?sslmode=prefer");
}

#[test]
fn masks_passwords_everywhere() {
    assert_eq!(
        mask_connection_string("postgres://u:secret@h:5432/db"),
        "postgres://u:***@h:5432/db"
    );
    let m = mask_connection_string("postgres://u@h/db?password=secret&sslmode=disable");
    assert!(
        !m.contains("secret") && m.contains("sslmode=disable"),
        "{m}"
    );
    assert_eq!(
        mask_connection_string("host=/tmp password=secret user=u"),
        "host=/tmp password=*** user=u"
    );
    assert_eq!(
        mask_connection_string("host=h password = 'se cr\\'et' dbname=d"),
        "host=h password=*** dbname=d"
    );
    assert_eq!(mask_connection_string("host=h user=u"), "host=h user=u");
    assert!(!mask_connection_string("postgres://u:secret@[bad").contains("secret"));
}

#[test]
fn masks_unparsable_strings() {
    assert_eq!(
        mask_connection_string("postgres://u:p%zz@h/d?password=x&a=b"),
        "postgres://u:***@h/d?password=***&a=b"
    );
    assert_eq!(
        mask_connection_string("host=h password='a b' user=u"),
        "host=h password=*** user=u"
    );
    let err = ConnectionSettings::parse("postgres://u:topsecret@h:notaport/d", None)
        .unwrap_err()
        .to_string();
    assert!(!err.contains("topsecret"), "{err}");
}

#[test]
fn tls_parameters_parse_as_libpq_spells_them() {
    let s = ConnectionSettings::parse(
        "postgres://u@h/d?sslmode=verify-full&sslrootcert=/ca.pem&sslcert=/c.pem&sslkey=/k.pem",
        None,
    )
    .unwrap();
    assert_eq!(s.sslmode, SslMode::VerifyFull);
    assert_eq!(s.sslrootcert, Some(RootCert::File("/ca.pem".into())));
    assert_eq!(s.sslcert.as_deref(), Some(Path::new("/c.pem")));
    assert_eq!(s.sslkey.as_deref(), Some(Path::new("/k.pem")));
    let s = ConnectionSettings::parse("sslmode=require sslrootcert=system host=h", None).unwrap();
    assert_eq!(s.sslrootcert, Some(RootCert::System));
    assert!(ConnectionSettings::parse("postgres://u@h/d?sslmode=nope", None).is_err());
    assert!(ConnectionSettings::parse("postgres://u@h/d?bogus=1", None).is_err());
}

#[test]
fn several_hosts_are_tried_in_order_as_libpq_lists_them() {
    let s = ConnectionSettings::parse(
        "postgresql://u@h1:5001,h2,[::1]:5003/d?target_session_attrs=read-write",
        None,
    )
    .unwrap();
    assert_eq!(
        s.hosts,
        vec![
            (Host::Tcp("h1".into()), 5001),
            (Host::Tcp("h2".into()), DEFAULT_PORT),
            (Host::Tcp("::1".into()), 5003),
        ]
    );
    assert_eq!((s.host.clone(), s.port), (Host::Tcp("h1".into()), 5001));
    assert_eq!(s.target_session_attrs, TargetSessionAttrs::ReadWrite);
    assert_eq!(
        s.to_string(),
        "postgres://u@h1:5001,h2:5432,[::1]:5003/d?sslmode=prefer&target_session_attrs=read-write"
    );
    let candidates = s.candidates();
    assert_eq!(candidates.len(), 3);
    assert_eq!(candidates[1].host, Host::Tcp("h2".into()));
    assert_eq!(candidates[1].port, DEFAULT_PORT);
    assert_eq!(candidates[1].hosts.len(), 1);
    assert_eq!(candidates[2].target(), "[::1]:5003");
    assert_eq!(
        candidates[2].target_session_attrs,
        TargetSessionAttrs::ReadWrite
    );

    // Keyword/value: one port for all hosts, or one per host.
    let s = ConnectionSettings::parse("host=a,b port=6000 user=u", None).unwrap();
    assert_eq!(
        s.hosts,
        vec![(Host::Tcp("a".into()), 6000), (Host::Tcp("b".into()), 6000)]
    );
    let s = ConnectionSettings::parse(
        "host=a,/run/pg port=6000,6001 user=u dbname=d target_session_attrs=primary",
        None,
    )
    .unwrap();
    assert_eq!(s.hosts[1], (Host::Unix("/run/pg".into()), 6001));
    assert_eq!(s.target_session_attrs, TargetSessionAttrs::ReadWrite);
    assert_eq!(
        s.to_string(),
        "postgres://u@/d?host=a,%2Frun%2Fpg&port=6000,6001&sslmode=prefer&target_session_attrs=read-write"
    );
    let err = ConnectionSettings::parse("host=a,b,c port=1,2", None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("3 hosts but 2 ports"), "{err}");
    let err = ConnectionSettings::parse("postgres://u@h/d?target_session_attrs=standby", None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("unsupported target_session_attrs"), "{err}");
    // One host: as before, no list in the URL.
    let s = ConnectionSettings::parse("postgres://u@h:1/d", None).unwrap();
    assert_eq!(s.hosts, vec![(Host::Tcp("h".into()), 1)]);
    assert_eq!(s.to_string(), "postgres://u@h:1/d?sslmode=prefer");
}
