//! Not a test helper any more: a bridge for `benches/backends.rs`, which includes this file by
//! path (`#[path = "../tests/redis_support/mod.rs"]`). The tests use the kit in
//! `tests/common`, and so does this bridge; it goes once the bench includes
//! `tests/common/mod.rs` itself.

#[path = "../common/mod.rs"]
mod common;

pub use common::redis::RedisServer;
pub use common::scenarios::BASE_MS;
pub use common::store::redis_settings;

/// Always true: when `redis-server` is missing this panics and says how to install it, as the
/// tests do, so the bench (which `cargo test --all-targets` also runs once) never skips its
/// Redis cases silently.
pub fn redis_available() -> bool {
    common::redis::require_redis();
    true
}
