//! sluice's Redis store and server settings pointed at a test Redis.
//!
//! The settings are generous on purpose (a 5 s command timeout): these tests check answers,
//! not latency, and a loaded two-core machine must not turn a slow reply into a failure. Tests
//! that measure time set their own bounds.

use std::time::Duration;

use sluice::config::settings::RedisSettings;
use sluice::limiter::redis::RedisStore;

/// Redis settings for tests: generous command timeout (these tests check answers, not
/// latency; a loaded CI machine must not turn a slow reply into a failure).
pub fn redis_settings(url: &str) -> RedisSettings {
    RedisSettings {
        url: url.to_string(),
        pool_size: 2,
        command_timeout: Duration::from_secs(5),
        ..RedisSettings::default()
    }
}

/// Switches server settings to the Redis backend at `url` (see [`redis_settings`]).
pub fn use_redis(settings: &mut sluice::config::Settings, url: &str) {
    settings.backend = sluice::config::settings::Backend::Redis;
    settings.redis = redis_settings(url);
}

pub async fn connect(url: &str) -> RedisStore {
    match tokio::time::timeout(
        Duration::from_secs(15),
        RedisStore::connect(&redis_settings(url)),
    )
    .await
    {
        Ok(Ok(store)) => {
            assert!(store.ready().is_ok(), "connected to {url} but not ready");
            store
        }
        Ok(Err(e)) => panic!("cannot connect to {url}: {e}"),
        Err(_) => panic!("RedisStore::connect({url}) hung for 15 s"),
    }
}
