//! The TLS client configuration of `redis.tls_*` (a CA bundle, a client certificate and
//! key), read from PEM files with errors that name the setting and the file.

use std::path::Path;
use std::sync::Arc;

use fred::rustls;
use fred::rustls::pki_types::pem::PemObject as _;
use fred::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::RedisSetupError;
use crate::limits::RedisSettings;

/// The rustls client configuration of `redis.tls_*`, or `None` when none is set (a
/// `rediss://` URL then trusts the system roots, fred's default).
///
/// With `tls_ca_file`, exactly the CAs of that PEM bundle are trusted, nothing else.
pub(super) fn tls_client_config(
    settings: &RedisSettings,
) -> Result<Option<rustls::ClientConfig>, RedisSetupError> {
    let (ca, cert, key) = (
        &settings.tls_ca_file,
        &settings.tls_client_cert_file,
        &settings.tls_client_key_file,
    );
    if ca.is_none() && cert.is_none() && key.is_none() {
        return Ok(None);
    }
    let roots = match ca {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            let pem = read_tls_file("tls_ca_file", path)?;
            for der in CertificateDer::pem_slice_iter(&pem) {
                let der = der.map_err(|e| pem_error("tls_ca_file", path, "certificate", e))?;
                roots
                    .add(der)
                    .map_err(|e| pem_error("tls_ca_file", path, "CA certificate", e))?;
            }
            if roots.is_empty() {
                return Err(pem_error("tls_ca_file", path, "certificate", ""));
            }
            roots
        }
        None => {
            // Only a client certificate: keep the system roots, as a plain rediss:// does.
            let mut roots = rustls::RootCertStore::empty();
            let native = fred::rustls_native_certs::load_native_certs();
            for der in native.certs {
                let _ = roots.add(der);
            }
            if roots.is_empty() {
                return Err(RedisSetupError::Tls(format!(
                    "no system root certificates could be loaded ({:?}); set redis.tls_ca_file",
                    native.errors
                )));
            }
            roots
        }
    };
    // Explicitly ring (the provider fred is built with), so no process-wide default is needed.
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| RedisSetupError::Tls(e.to_string()))?
    .with_root_certificates(roots);
    let config = match (cert, key) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert_path), Some(key_path)) => {
            let pem = read_tls_file("tls_client_cert_file", cert_path)?;
            let chain = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| pem_error("tls_client_cert_file", cert_path, "certificate", e))?;
            if chain.is_empty() {
                return Err(pem_error(
                    "tls_client_cert_file",
                    cert_path,
                    "certificate",
                    "",
                ));
            }
            let pem = read_tls_file("tls_client_key_file", key_path)?;
            let key = PrivateKeyDer::from_pem_slice(&pem)
                .map_err(|e| pem_error("tls_client_key_file", key_path, "private key", e))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| RedisSetupError::Tls(format!("client certificate and key: {e}")))?
        }
        _ => return Err(RedisSetupError::TlsClientPair),
    };
    Ok(Some(config))
}

fn read_tls_file(setting: &'static str, path: &Path) -> Result<Vec<u8>, RedisSetupError> {
    std::fs::read(path).map_err(|source| RedisSetupError::TlsFile {
        setting,
        path: path.display().to_string(),
        source,
    })
}

fn pem_error(
    setting: &'static str,
    path: &Path,
    what: &'static str,
    detail: impl std::fmt::Display,
) -> RedisSetupError {
    let detail = detail.to_string();
    RedisSetupError::TlsPem {
        setting,
        path: path.display().to_string(),
        what,
        detail: if detail.is_empty() {
            String::new()
        } else {
            format!(": {detail}")
        },
    }
}
