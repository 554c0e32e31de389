//! `fallback.response_header`: answers the fallback gave carry `X-Sluice-Fallback: true`
//! (opt-in), and `dynamic_metadata.source` says `fallback` either way.

mod common;

use common::rls::{header, metadata};
use common::sluice::Sluice;
use sluice::config::settings::Backend;

const LIMITS: &str = "\
domain: d
routes:
  - name: r
    global_threshold: { query_per_minute: 10 }
";

async fn with_redis_down(response_header: bool) -> Sluice {
    // A loopback port nothing listens on: Redis is down from the start.
    let port = common::free_port();
    Sluice::start_with(&[("d.yaml", LIMITS)], move |s| {
        s.backend = Backend::Redis;
        s.redis.url = format!("redis://127.0.0.1:{port}");
        s.redis.connect_timeout = std::time::Duration::from_millis(100);
        s.fallback.response_header = response_header;
    })
    .await
}

#[tokio::test]
async fn fallback_answers_carry_the_header_when_asked_for() {
    let mut sluice = with_redis_down(true).await;
    let response = sluice
        .ask_one("d", common::rls::desc(&[("route", "r")]))
        .await;
    assert_eq!(metadata(&response, "source"), Some("fallback"));
    assert_eq!(header(&response, "X-Sluice-Fallback"), Some("true"));
    assert_eq!(
        response.statuses[0].limit_remaining, 9,
        "local counting answered"
    );
}

#[tokio::test]
async fn without_the_setting_no_header_is_added() {
    let mut sluice = with_redis_down(false).await;
    let response = sluice
        .ask_one("d", common::rls::desc(&[("route", "r")]))
        .await;
    assert_eq!(metadata(&response, "source"), Some("fallback"));
    assert_eq!(header(&response, "X-Sluice-Fallback"), None);
}
