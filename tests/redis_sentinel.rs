//! Redis behind Sentinel: sluice asks the sentinel for `mymaster`, counts on that master,
//! and the replica follows. One master, one replica and one sentinel per test, on free
//! loopback ports (killed on drop).

mod common;

use common::resp::Resp;
use common::rls::{Code, Unit, limit, metadata, status};
use common::scenarios::{BASE_MS, check_table};
use common::sentinel::RedisSentinel;
use common::sluice::Sluice;
use common::store::{connect, use_redis};
use common::{MINUTE, wait_until};

const LIMITS: &str = r#"
domain: sen
defaults: { timeout: 5s, fallback: error }
routes:
  - name: r
    global_threshold: { query_per_minute: 2 }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sluice_counts_on_the_master_the_sentinel_names() {
    let setup = RedisSentinel::start(1);
    let mut sluice =
        Sluice::start_with(&[("sen.yaml", LIMITS)], |s| use_redis(s, &setup.url())).await;
    sluice.clock.set(BASE_MS + 15_250);

    let expected = limit(2, Unit::Minute, "r/global");
    for (remaining, code) in [(1, Code::Ok), (0, Code::Ok), (0, Code::OverLimit)] {
        let now = sluice.now();
        let response = sluice.ask("sen", &[&[("route", "r")]]).await;
        assert_eq!(
            response.statuses,
            vec![status(code, &expected, remaining, MINUTE - now % MINUTE)]
        );
        assert_eq!(metadata(&response, "source"), Some("redis"));
        sluice.advance(1);
    }

    let keys = setup.master.keys(0, "sluice:*");
    assert_eq!(keys.len(), 1, "one counter on the master: {keys:?}");
    let key = String::from_utf8(keys[0].clone()).expect("ASCII key");
    assert_eq!(setup.master.cmd(&["GET", &key]), Resp::Bulk(b"3".to_vec()));
    // The replica catches up (asynchronous replication: bounded wait).
    wait_until(
        "the replica to have the counter",
        std::time::Duration::from_secs(10),
        || (setup.replica.cmd(&["GET", &key]) == Resp::Bulk(b"3".to_vec())).then_some(()),
    );
    sluice.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_table_matches_memory_through_sentinel() {
    let setup = RedisSentinel::start(1);
    let store = connect(&setup.url()).await;
    check_table(&store, "table").await;
    assert!(
        !setup.master.keys(0, "sluice:*").is_empty(),
        "the counters are on the master"
    );
}
