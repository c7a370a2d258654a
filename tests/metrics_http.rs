//! The metrics endpoint over real HTTP: routes, status codes, bodies, bind
//! errors and shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cache_invalidator::decode::Op;
use cache_invalidator::metrics::{self, Health, InvalidationKind, Metrics, Role};
use cache_invalidator::shutdown::ShutdownTrigger;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One request with `Connection: close`; returns (status, headers, body).
async fn request(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("response within 10 s")
        .unwrap();
    let raw = String::from_utf8(raw).expect("utf-8 response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("header/body separator");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    (status, head.to_ascii_lowercase(), body.to_string())
}

struct Server {
    addr: SocketAddr,
    stop: ShutdownTrigger,
    task: tokio::task::JoinHandle<()>,
}

async fn start(m: Arc<Metrics>, h: Arc<Health>) -> Server {
    let listener = metrics::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = ShutdownTrigger::new();
    let task = tokio::spawn(metrics::serve_on(listener, m, h, rx));
    Server { addr, stop, task }
}

#[tokio::test]
async fn routes_status_codes_and_bodies() {
    let m = Metrics::new();
    let h = Health::new();
    let srv = start(Arc::clone(&m), Arc::clone(&h)).await;

    m.transaction(2);
    m.change("public.users", Op::Update);
    m.invalidations(InvalidationKind::Versions, 5);
    m.confirmed(0x16B3748, Some(100));

    let (code, head, body) = request(srv.addr, "GET", "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        head.contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    assert!(
        body.contains("\ncache_invalidator_transactions_total 2\n"),
        "{body}"
    );
    assert!(
        body.contains(
            "\ncache_invalidator_changes_total{table=\"public.users\",op=\"update\"} 1\n"
        ),
        "{body}"
    );
    assert!(
        body.contains("\ncache_invalidator_invalidations_total{kind=\"versions\"} 5\n"),
        "{body}"
    );
    assert!(
        body.contains("\ncache_invalidator_confirmed_lsn 23803720\n"),
        "{body}"
    );
    assert!(body.ends_with("# EOF\n"));

    // Fresh state: alive, not ready.
    assert_eq!(request(srv.addr, "GET", "/livez").await.0, 200);
    let (code, _, body) = request(srv.addr, "GET", "/readyz").await;
    assert_eq!(
        (code, body.as_str()),
        (
            503,
            "not streaming: starting\nredis unreachable: not connected yet"
        )
    );

    h.set_role(Role::Active);
    h.set_streaming();
    h.set_redis_reachable();
    let (code, _, body) = request(srv.addr, "GET", "/readyz").await;
    assert_eq!((code, body.as_str()), (200, "ok"));

    h.set_blocked(Some("NOPERM no permission to run 'unlink'".into()));
    let (code, _, body) = request(srv.addr, "GET", "/readyz").await;
    assert_eq!(
        (code, body.as_str()),
        (503, "blocked: NOPERM no permission to run 'unlink'")
    );
    h.set_blocked(None);

    // A standby is alive but not ready.
    h.set_role(Role::Standby);
    h.touch();
    assert_eq!(request(srv.addr, "GET", "/livez").await.0, 200);
    let (code, _, body) = request(srv.addr, "GET", "/readyz").await;
    assert_eq!((code, body.as_str()), (503, "standby"));

    let (code, _, body) = request(srv.addr, "GET", "/nope").await;
    assert_eq!(code, 404);
    assert!(body.contains("/metrics"), "{body}");
    let (code, head, _) = request(srv.addr, "POST", "/metrics").await;
    assert_eq!(code, 405);
    assert!(head.contains("allow: get, head"), "{head}");
    let (code, _, body) = request(srv.addr, "HEAD", "/livez").await;
    assert_eq!((code, body.as_str()), (200, ""));

    srv.stop.trigger();
    tokio::time::timeout(Duration::from_secs(5), srv.task)
        .await
        .expect("serve returns after stop")
        .unwrap();
    assert!(
        TcpStream::connect(srv.addr).await.is_err(),
        "listener closed after stop"
    );
}

#[tokio::test]
async fn keep_alive_connection_serves_several_requests() {
    let srv = start(Metrics::new(), Health::new()).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    for _ in 0..2 {
        s.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nok"), "{text}");
    }
    // Stopping does not wait for the idle keep-alive connection.
    srv.stop.trigger();
    tokio::time::timeout(Duration::from_secs(5), srv.task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn dropped_stop_sender_stops_the_server() {
    let srv = start(Metrics::new(), Health::new()).await;
    drop(srv.stop);
    tokio::time::timeout(Duration::from_secs(5), srv.task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn bind_error_names_the_address_and_the_setting() {
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = taken.local_addr().unwrap();
    let (_stop, rx) = ShutdownTrigger::new();
    let err = metrics::serve(addr, Metrics::new(), Health::new(), rx)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("cannot listen on {addr} for metrics: address in use; change [metrics] listen")
    );
    assert!(
        std::error::Error::source(&err).is_some(),
        "the io::Error is kept as source"
    );
}
