//! Memory pressure with a store: an idle session's history is dropped from memory only. The
//! heap reading is set by hand, which only a daemon in this process allows, so this test
//! starts the library (`blufio::spawn`, as `main` does) on a real state directory and talks
//! to it over real sockets.

use std::{sync::Arc, time::Duration};

use blufio::{Config, Context, FixedRss, ManualHeap};
use blufio_testkit::temp::temp_dir;

use super::Client;
use crate::{
    prometheus,
    support::{self, ScriptedAgent, TOKEN},
};

const MIB: u64 = 1024 * 1024;

#[test]
fn pressure_drops_an_idle_stored_history_from_memory_only_and_the_next_message_reads_it_back() {
    let state = temp_dir("store-pressure");
    let heap = Arc::new(ManualHeap::new(10 * MIB));
    let mut config = Config::for_tests();
    config.gateway.token = Some(blufio::Secret::new(TOKEN));
    config.daemon.state_dir = Some(state.to_path_buf());
    config.daemon.memory_warn_mb = 20;
    config.daemon.memory_limit_mb = 30;
    // Idle for shedding after a quarter of this: 1 s.
    config.gateway.session_idle_timeout_secs = 4;
    let daemon = support::start_with(
        Context::builder(config)
            .with_heap_source(Arc::clone(&heap))
            .with_rss_source(FixedRss(Some(15 * MIB)))
            .with_agent(ScriptedAgent),
    );
    let client = Client(daemon.gateway_addr());
    let id = client.say_ok(None, "one")["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    client.say_ok(Some(&id), "two");
    client.say_ok(Some(&id), "three");
    let before = client.messages(&id);
    assert_eq!(before.len(), 6);
    std::thread::sleep(Duration::from_millis(1200));

    heap.set(25 * MIB);
    daemon.tick();
    let exposition = prometheus::parse(&daemon.get_ok("/metrics"));
    assert_eq!(exposition.value("blufio_memory_pressure", &[]), Some(1.0));
    let info = client.call("GET", &format!("/v1/sessions/{id}"), None);
    assert_eq!(info.status, 200, "the session stays open: {}", info.body);
    let info = info.json();
    assert_eq!(info["history_messages"], 0, "history dropped: {info}");
    assert_eq!(info["message_count"], 6, "{info}");

    // Every message is still there, from the store.
    assert_eq!(client.messages(&id), before);
    heap.set(10 * MIB);
    daemon.tick();
    // The scripted agent reports the history it was given: all six turns, read back.
    let reply = client.say_ok(Some(&id), "four");
    assert_eq!(reply["content"], "re: four (history 6)", "{reply}");
    let after = client.messages(&id);
    assert_eq!(after.len(), 8);
    assert_eq!(after[..6], before[..]);
    assert_eq!(after[6]["seq"], 6);
    assert_eq!(after[6]["content"], "four");
    assert_eq!(after[7]["seq"], 7);
    daemon.stop();
}
