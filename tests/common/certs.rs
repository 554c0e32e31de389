//! Certificates for the TLS tests, made at test time with rcgen: nothing secret or expiring
//! is kept in the repository, and each test gets keys no other test shares.
//!
//! This is the only place in `tests/` that makes certificates or keys. A [`Pki`] is what both
//! the gRPC TLS tests and the Redis TLS tests need: a CA, a server certificate for
//! `localhost` and `127.0.0.1` (so a client may dial either), and a client certificate, all
//! signed by that CA. A second `Pki` plays "another CA" when a test needs a certificate that
//! must not be trusted.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A certificate and its private key, PEM.
#[derive(Clone)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

/// A CA (its certificate, PEM) and what it signed.
#[derive(Clone)]
pub struct Pki {
    pub ca: String,
    /// For `localhost` and `127.0.0.1`, server authentication.
    pub server: Pem,
    /// Client authentication.
    pub client: Pem,
}

impl Pki {
    /// A fresh CA with common name `ca_name`, a server and a client certificate.
    pub fn new(ca_name: &str) -> Self {
        let (ca, issuer) = ca(ca_name);
        Pki {
            ca,
            server: leaf(
                &issuer,
                &["localhost", "127.0.0.1"],
                ExtendedKeyUsagePurpose::ServerAuth,
            ),
            client: leaf(
                &issuer,
                &["sluice-test-client"],
                ExtendedKeyUsagePurpose::ClientAuth,
            ),
        }
    }

    /// Writes `<prefix>ca.pem`, `<prefix>server.pem`, `<prefix>server.key`,
    /// `<prefix>client.pem` and `<prefix>client.key` into `dir`.
    pub fn write(&self, dir: &Path, prefix: &str) {
        for (name, pem) in [
            ("ca.pem", &self.ca),
            ("server.pem", &self.server.cert),
            ("server.key", &self.server.key),
            ("client.pem", &self.client.cert),
            ("client.key", &self.client.key),
        ] {
            write_pem(dir, &format!("{prefix}{name}"), pem);
        }
    }
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write_pem(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

/// A private key alone, PEM: for checking that a key is not taken for a certificate.
pub fn key_pem() -> String {
    KeyPair::generate().expect("generate a key").serialize_pem()
}

fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).expect("self-signed CA");
    (cert.pem(), Issuer::new(params, key))
}

/// A certificate for `names` signed by `issuer`, with its key.
fn leaf(issuer: &Issuer<'static, KeyPair>, names: &[&str], usage: ExtendedKeyUsagePurpose) -> Pem {
    let key = KeyPair::generate().expect("leaf key");
    let mut params =
        CertificateParams::new(names.iter().map(|n| (*n).to_string()).collect::<Vec<_>>())
            .expect("leaf params");
    params.distinguished_name.push(DnType::CommonName, names[0]);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![usage];
    let cert = params.signed_by(&key, issuer).expect("sign leaf");
    Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}
