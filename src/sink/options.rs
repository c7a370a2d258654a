//! [`SinkOptions`]: how to reach Redis (URL, password override, TLS files)
//! and what to do beyond the plan itself (WAIT, the delayed second delete).
//! Built from the service config by `Config::sink_options`.

use std::path::PathBuf;
use std::time::Duration;

use super::error::mask_url;

/// TLS files for a `rediss://` URL: `[redis] tls_ca_file`, `tls_cert_file`,
/// `tls_key_file` (PEM). Without a CA file the system's store is used.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    /// CA certificates to check the server's certificate against.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (chain), for `tls-auth-clients yes`.
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key.
    pub key_file: Option<PathBuf>,
}

impl RedisTls {
    /// True when no file is set.
    pub fn is_empty(&self) -> bool {
        self.ca_file.is_none() && self.cert_file.is_none() && self.key_file.is_none()
    }
}

/// How to reach Redis and what to do beyond the plan itself. `Debug` masks
/// the password in the URL and never shows `password`.
#[derive(Clone)]
pub struct SinkOptions {
    /// `redis://` or `rediss://` URL (user and password allowed; never logged unmasked).
    pub url: String,
    /// A password that overrides the URL's (from `password_file`).
    pub password: Option<String>,
    /// > 0: WAIT for that many replicas after each plan.
    pub wait_replicas: u32,
    /// > 0: a best-effort second pass of the plan's key and tag deletes after this delay.
    pub redelete_after: Option<Duration>,
    /// TLS files for `rediss://`.
    pub tls: RedisTls,
}

impl std::fmt::Debug for SinkOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkOptions")
            .field("url", &mask_url(&self.url))
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("wait_replicas", &self.wait_replicas)
            .field("redelete_after", &self.redelete_after)
            .field("tls", &self.tls)
            .finish()
    }
}
