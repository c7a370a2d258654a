//! The redis client for [`SinkOptions`]: the password override and, for
//! `rediss://`, the CA and client certificate files. Errors name the URL
//! (masked) and the files, never a secret.

use std::path::PathBuf;

use super::error::{mask_url, SinkError};
use super::SinkOptions;

/// The redis client for `options`: password override, and for `rediss://`
/// the CA and client certificate files. Errors name files, never secrets.
pub fn client(options: &SinkOptions) -> Result<redis::Client, SinkError> {
    let target = mask_url(&options.url);
    let mut info = redis::IntoConnectionInfo::into_connection_info(options.url.as_str())
        .map_err(|e| SinkError::Config(format!("{target}: {}", redact(&e, options))))?;
    if let Some(password) = &options.password {
        let settings = info.redis_settings().clone().set_password(password);
        info = info.set_redis_settings(settings);
    }
    let tls = matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. });
    if options.tls.is_empty() {
        return redis::Client::open(info)
            .map_err(|e| SinkError::Config(format!("{target}: {}", redact(&e, options))));
    }
    if !tls {
        return Err(SinkError::Config(format!(
            "{target}: tls_ca_file, tls_cert_file and tls_key_file need a rediss:// URL"
        )));
    }
    let read = |p: &PathBuf, what: &str| {
        std::fs::read(p).map_err(|e| {
            SinkError::Config(format!("{target}: cannot read {what} {}: {e}", p.display()))
        })
    };
    let client_tls = match (&options.tls.cert_file, &options.tls.key_file) {
        (Some(c), Some(k)) => Some(redis::ClientTlsConfig {
            client_cert: read(c, "tls_cert_file")?,
            client_key: read(k, "tls_key_file")?,
        }),
        (None, None) => None,
        _ => {
            return Err(SinkError::Config(format!(
                "{target}: tls_cert_file and tls_key_file go together: set both or neither"
            )))
        }
    };
    let root_cert = match &options.tls.ca_file {
        Some(p) => Some(read(p, "tls_ca_file")?),
        None => None,
    };
    redis::Client::build_with_tls(
        info,
        redis::TlsCertificates {
            client_tls,
            root_cert,
        },
    )
    .map_err(|e| {
        SinkError::Config(format!(
            "{target}: unusable TLS files: {}",
            redact(&e, options)
        ))
    })
}

/// An error's text with the URL's and the override's passwords cut out (in
/// case a library ever echoes its input).
pub(super) fn redact(e: &dyn std::fmt::Display, options: &SinkOptions) -> String {
    let mut text = e.to_string();
    let url_password = url::Url::parse(&options.url)
        .ok()
        .and_then(|u| u.password().map(str::to_string));
    for secret in options.password.iter().chain(url_password.iter()) {
        if !secret.is_empty() {
            text = text.replace(secret.as_str(), "***");
        }
    }
    text
}
