//! How to reach Redis: the settings the configuration reads and the Redis store connects
//! with, and how a Redis URL is shown without its secrets.
//!
//! Plain data, kept here (below both readers) so the store does not import the configuration
//! layer and the configuration does not import the store.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSettings {
    /// `redis://`, `rediss://` (TLS), `redis-sentinel://` or a cluster node list.
    pub url: String,
    pub username: Option<String>,
    /// Prefer `password_file` (or SLUICE_REDIS_PASSWORD) so the secret stays out of this file.
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    pub database: u32,
    pub pool_size: usize,
    /// How long a connection attempt may take (start-up and reconnects).
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// fred's own bound on one command; the route's `timeout` (10 ms by default) is what
    /// bounds a request, so this only has to be no shorter than it.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// PEM bundle of the CAs trusted for a `rediss://` URL, instead of the system roots.
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate chain presented to Redis (mTLS); needs `tls_client_key_file`.
    pub tls_client_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_client_cert_file`.
    pub tls_client_key_file: Option<PathBuf>,
    /// Refuse to start when Redis's `maxmemory-policy` (read at connect) is not
    /// `noeviction`, or cannot be read: any other policy may evict counters and reset limits.
    pub require_noeviction: bool,
    /// How often `maxmemory-policy` is read again (a changed policy shows within this).
    #[serde(with = "humantime_serde")]
    pub eviction_check_interval: Duration,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            username: None,
            password: None,
            password_file: None,
            database: 0,
            pool_size: 4,
            connect_timeout: Duration::from_secs(1),
            command_timeout: Duration::from_millis(10),
            tls_ca_file: None,
            tls_client_cert_file: None,
            tls_client_key_file: None,
            require_noeviction: false,
            eviction_check_interval: Duration::from_secs(60),
        }
    }
}

/// What `/config` and logs show of a secret.
pub const REDACTED: &str = "<redacted>";

/// `redis://user:secret@host` -> `redis://user:<redacted>@host`, and the value of any query
/// parameter naming a password (fred's `sentinelPassword=`), for every URL form.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (location, query) = match rest.split_once('?') {
        Some((location, query)) => (location, Some(query)),
        None => (rest, None),
    };
    let mut shown = format!("{scheme}://");
    match location.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => shown.push_str(&format!("{user}:{REDACTED}@{host}")),
            None => shown.push_str(location),
        },
        None => shown.push_str(location),
    }
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((name, _)) if name.to_ascii_lowercase().contains("password") => {
                    format!("{name}={REDACTED}")
                }
                _ => param.to_string(),
            })
            .collect();
        shown.push('?');
        shown.push_str(&params.join("&"));
    }
    shown
}
