//! Where the limits come from (`limits_source`) and, for `xds`, how the management server is
//! reached: the settings the xDS source (`config::xds`) is built from.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitsSource {
    Files,
    Xds,
}

/// The ADS client of `limits_source: xds` (see `config::xds`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct XdsSettings {
    /// The management server, `host:port`.
    pub server_url: String,
    /// The node id the management server keys its snapshots by.
    pub node_id: String,
    /// The node's cluster, for servers that key by it.
    pub node_cluster: String,
    /// Node metadata as `key=value,key=value` (string values), as envoyproxy/ratelimit's
    /// `CONFIG_GRPC_XDS_NODE_METADATA` writes it.
    pub node_metadata: String,
    /// gRPC metadata sent on the stream, as `key:value,key:value` (for servers that
    /// authenticate by header).
    pub headers: String,
    /// Serve (and report ready) before the first set of limits has arrived; until then
    /// every request is answered OK. Off: `/readyz` is 503 until the first set.
    pub start_without_initial_config: bool,
    /// First reconnect delay after a lost stream; it doubles per failed attempt up to
    /// `backoff_max`, each delay jittered between half and all of it.
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// How long one connection attempt may take.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Largest discovery response accepted, in bytes.
    pub max_message_bytes: usize,
    pub tls: XdsTlsSettings,
}

impl Default for XdsSettings {
    fn default() -> Self {
        Self {
            server_url: String::new(),
            node_id: "sluice".into(),
            node_cluster: String::new(),
            node_metadata: String::new(),
            headers: String::new(),
            start_without_initial_config: false,
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            max_message_bytes: 4 << 20,
            tls: XdsTlsSettings::default(),
        }
    }
}

/// TLS to the management server.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct XdsTlsSettings {
    /// Connect over TLS (the system roots verify the server unless `ca_file` is set).
    pub enabled: bool,
    /// PEM CA bundle that verifies the management server.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain (mTLS); needs `key_file`.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The name the server's certificate is checked against, when not the host of
    /// `server_url`.
    pub server_name: Option<String>,
}

/// `key=value,key=value` (or `key:value` with `separator` ':') into pairs; empty parts are
/// skipped.
pub fn parse_pairs(text: &str, separator: char) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once(separator) {
            Some((k, v)) if !k.trim().is_empty() => {
                pairs.push((k.trim().to_string(), v.trim().to_string()))
            }
            _ => {
                return Err(format!(
                    "\"{part}\" is not key{separator}value: write key{separator}value pairs \
                     separated by commas"
                ));
            }
        }
    }
    Ok(pairs)
}
