//! TLS for both PostgreSQL connections (replication and SQL), with rustls,
//! following libpq's `sslmode` semantics:
//!
//! | sslmode | TLS | certificate checked |
//! | --- | --- | --- |
//! | `disable` | never | - |
//! | `allow` | never (we do not retry with TLS) | - |
//! | `prefer` (default) | if the server accepts it, else plaintext | only when a root certificate is given or `~/.postgresql/root.crt` exists (then as `verify-ca`) |
//! | `require` | always, refused if the server has no TLS | as `prefer` |
//! | `verify-ca` | always | chain against `sslrootcert` |
//! | `verify-full` | always | chain and host name |
//!
//! `sslrootcert` is a PEM file of CA certificates, or `system` for the
//! operating system's store. `sslcert` and `sslkey` are a PEM client
//! certificate (chain) and its key (PKCS#8, PKCS#1 or SEC1); without them
//! `~/.postgresql/postgresql.crt` and `.key` are used when both exist.
//! Unix-socket connections never use TLS.
//!
//! This module builds the rustls [`ClientConfig`]; the connections do the
//! SSLRequest exchange themselves.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use super::conninfo::{ConnectionSettings, Host, RootCert, SslMode};
use super::error::SourceError;

/// How the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verification {
    /// Not at all (`require`/`prefer` without a root certificate): encryption
    /// against passive eavesdropping only, as libpq does.
    None,
    /// The chain against the root certificates, not the host name (`verify-ca`).
    Chain,
    /// The chain and the host name (`verify-full`).
    Full,
}

/// What the connections need to do TLS: the rustls config and whether the
/// server may decline (`prefer`).
#[derive(Clone)]
pub struct TlsSetup {
    /// The rustls client config (ring provider).
    pub config: Arc<ClientConfig>,
    /// `true` for `prefer`: a server answering 'N' to SSLRequest is used in plaintext.
    pub optional: bool,
    /// How the certificate is checked.
    pub verification: Verification,
}

impl std::fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSetup")
            .field("optional", &self.optional)
            .field("verification", &self.verification)
            .finish()
    }
}

/// The name the certificate must carry: the host as written in the URL.
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_string())
        .map_err(|e| format!("{host:?} is not a valid TLS server name: {e}"))
}

/// The TLS setup the settings ask for; `None` for plaintext (`disable`,
/// `allow`, unix sockets).
pub fn setup(settings: &ConnectionSettings) -> Result<Option<TlsSetup>, SourceError> {
    if matches!(settings.host, Host::Unix(_)) {
        return Ok(None);
    }
    let invalid = |reason: String| SourceError::TlsConfig {
        url: settings.to_string(),
        reason,
    };
    let (optional, explicit) = match settings.sslmode {
        SslMode::Disable | SslMode::Allow => return Ok(None),
        SslMode::Prefer => (true, None),
        SslMode::Require => (false, None),
        SslMode::VerifyCa => (false, Some(Verification::Chain)),
        SslMode::VerifyFull => (false, Some(Verification::Full)),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = match &settings.sslrootcert {
        Some(RootCert::File(path)) => Some(load_roots(path).map_err(invalid)?),
        Some(RootCert::System) => Some(system_roots().map_err(invalid)?),
        None => match default_file("root.crt") {
            Some(path) => Some(load_roots(&path).map_err(invalid)?),
            None => None,
        },
    };
    let verification = match (explicit, &roots) {
        (Some(v), Some(_)) => v,
        (Some(_), None) => {
            return Err(invalid(format!(
                "sslmode={} needs root certificates to check the server's certificate against: set sslrootcert=/path/to/ca.pem (or sslrootcert=system), or use sslmode=require",
                settings.sslmode.as_str()
            )))
        }
        // libpq: with a root certificate, require (and prefer) behave as verify-ca.
        (None, Some(_)) => Verification::Chain,
        (None, None) => Verification::None,
    };
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(e.to_string()))?;
    let verifier: Arc<dyn ServerCertVerifier> = match (verification, roots) {
        (Verification::None, _) | (_, None) => Arc::new(Lenient {
            chain: None,
            provider: Arc::clone(&provider),
        }),
        (v, Some(roots)) => {
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                    .build()
                    .map_err(|e| invalid(format!("unusable root certificates: {e}")))?;
            if v == Verification::Full {
                webpki
            } else {
                Arc::new(Lenient {
                    chain: Some(webpki),
                    provider: Arc::clone(&provider),
                })
            }
        }
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let client_files = match (&settings.sslcert, &settings.sslkey) {
        (Some(c), Some(k)) => Some((c.clone(), k.clone())),
        (Some(_), None) | (None, Some(_)) => {
            return Err(invalid(
                "sslcert and sslkey go together: set both (PEM files) or neither".into(),
            ))
        }
        (None, None) => match (
            default_file("postgresql.crt"),
            default_file("postgresql.key"),
        ) {
            (Some(c), Some(k)) => Some((c, k)),
            _ => None,
        },
    };
    let config = match client_files {
        Some((cert, key)) => {
            let chain = load_certs(&cert).map_err(invalid)?;
            let key = load_key(&key).map_err(invalid)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| invalid(format!("unusable client certificate or key: {e}")))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Some(TlsSetup {
        config: Arc::new(config),
        optional,
        verification,
    }))
}

/// `~/.postgresql/<name>` when it exists (libpq's defaults).
fn default_file(name: &str) -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let p = Path::new(&home).join(".postgresql").join(name);
    p.is_file().then_some(p)
}

/// Reads a PEM file of certificates (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read certificates from {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "no PEM certificate (-----BEGIN CERTIFICATE-----) in {}",
            path.display()
        ));
    }
    Ok(certs)
}

/// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1). The key's bytes never
/// appear in an error.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("cannot read a PEM private key from {}: {e}", path.display()))
}

fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    for cert in load_certs(path)? {
        store
            .add(cert)
            .map_err(|e| format!("invalid CA certificate in {}: {e}", path.display()))?;
    }
    Ok(store)
}

fn system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut store = RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err("sslrootcert=system: no usable certificate in the system's store".into());
    }
    Ok(store)
}

/// The checks libpq makes that rustls's [`WebPkiServerVerifier`] does not
/// offer alone: `verify-ca` (the chain must lead to a trusted root; the host
/// name is not checked) and `require` without a root certificate (any
/// certificate is accepted, exactly as libpq does). Either way the handshake
/// signatures are checked with the provider's algorithms, as the webpki
/// verifier checks them.
#[derive(Debug)]
struct Lenient {
    /// The chain check (`verify-ca`); `None` accepts any certificate.
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str) -> ConnectionSettings {
        ConnectionSettings::parse(url, None).unwrap()
    }

    #[test]
    fn plaintext_modes_and_unix_sockets_have_no_tls() {
        assert!(setup(&settings("postgres://u@h/d?sslmode=disable"))
            .unwrap()
            .is_none());
        assert!(
            setup(&settings("postgres://u@/d?host=/tmp&sslmode=verify-full"))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn verify_modes_need_a_root_certificate() {
        // (Assumes no ~/.postgresql/root.crt on the test machine.)
        let err = setup(&settings("postgres://u@h/d?sslmode=verify-full"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("sslrootcert"), "{err}");
        let s = setup(&settings("postgres://u@h/d?sslmode=require"))
            .unwrap()
            .unwrap();
        assert_eq!((s.optional, s.verification), (false, Verification::None));
        let err = setup(&settings("postgres://u@h/d?sslmode=require&sslcert=/x"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("sslcert and sslkey go together"), "{err}");
        let err = setup(&settings(
            "postgres://u@h/d?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem",
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }
}
