//! The HTTP endpoint: `/metrics`, `/livez` and `/readyz` on `[metrics] listen`.
//!
//! hyper 1 with hyper-util's Tokio glue: the smallest well-kept server that
//! parses HTTP for us; three fixed routes need no router.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;

use super::{Health, Metrics};

/// The metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Binding the listen address failed.
    #[error("cannot listen on {addr} for metrics: {what}; change [metrics] listen")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// What went wrong, in words (`address in use`).
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Binds the metrics listener, with an error that names the address and the setting to change.
pub async fn bind(listen: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: listen,
            what: match source.kind() {
                io::ErrorKind::AddrInUse => "address in use",
                io::ErrorKind::AddrNotAvailable => "address not available on this host",
                io::ErrorKind::PermissionDenied => "permission denied",
                _ => "bind failed",
            },
            source,
        })
}

/// Serves `/metrics`, `/livez` and `/readyz` on `listen` until shutdown is
/// requested. See [`serve_on`] for a pre-bound listener.
pub async fn serve(
    listen: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    stop: crate::shutdown::Shutdown,
) -> Result<(), ServeError> {
    let listener = bind(listen).await?;
    serve_on(listener, metrics, health, stop).await;
    Ok(())
}

/// Serves on an already bound listener (tests bind `127.0.0.1:0`). Returns
/// when shutdown is requested; open connections are dropped then.
pub async fn serve_on(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    mut stop: crate::shutdown::Shutdown,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            biased;
            // Shutdown first.
            () = stop.requested() => break,
            // Reap finished connections so the set does not grow.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let (m, h) = (Arc::clone(&metrics), Arc::clone(&health));
                    conns.spawn(async move {
                        let io = hyper_util::rt::TokioIo::new(stream);
                        let svc = hyper::service::service_fn(move |req| {
                            let resp = respond(&req, &m, &h);
                            async move { Ok::<_, Infallible>(resp) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .timer(hyper_util::rt::TokioTimer::new())
                            .header_read_timeout(Duration::from_secs(10))
                            .serve_connection(io, svc)
                            .await;
                    });
                }
                Err(err) => {
                    // Out of file descriptors and the like: keep serving.
                    tracing::warn!(error = %err, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    conns.shutdown().await;
}

/// Content type of the OpenMetrics text format.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

fn respond<B>(req: &Request<B>, metrics: &Metrics, health: &Health) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(405, TEXT, "method not allowed: use GET\n".into());
    }
    match req.uri().path() {
        "/metrics" => reply(200, OPENMETRICS, metrics.render()),
        "/livez" => {
            let (code, body) = health.livez();
            reply(code, TEXT, body)
        }
        "/readyz" => {
            let (code, body) = health.readyz();
            reply(code, TEXT, body)
        }
        _ => reply(
            404,
            TEXT,
            "not found: try /metrics, /livez or /readyz\n".into(),
        ),
    }
}

fn reply(code: u16, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    if code == 405 {
        resp.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
    }
    resp
}
