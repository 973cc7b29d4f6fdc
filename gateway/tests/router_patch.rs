//! The vendored rumqttd's routing patch (vendor/rumqttd/PATCHES.md) keeps MQTT's matching
//! rules: exact filters are looked up instead of scanned, wildcard filters are still matched,
//! whatever the order of subscribing and first publishing, and retained messages reach exact
//! and wildcard subscribers alike.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::Notification;

fn router_config() -> rumqttd::RouterConfig {
    rumqttd::RouterConfig {
        max_connections: 1024,
        max_outgoing_packet_count: 1024,
        max_segment_size: 1024 * 1024,
        max_segment_count: 2,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    }
}

/// Starts a router and gives a function that attaches a new in-process client to it.
fn router() -> impl Fn(&str) -> (LinkTx, LinkRx) {
    let router_tx = rumqttd::Router::new(0, router_config()).spawn();
    move |name| {
        let (tx, rx, _) = LinkBuilder::new(name, router_tx.clone()).build().unwrap();
        (tx, rx)
    }
}

/// Every (topic, payload) `rx` receives within `wait`.
fn drain(rx: &mut LinkRx, wait: Duration) -> Vec<(String, Vec<u8>)> {
    let end = Instant::now() + wait;
    let mut got = Vec::new();
    while let Ok(Some(n)) = rx.recv_deadline(end) {
        match n {
            Notification::Forward(f) => got.push((
                String::from_utf8(f.publish.topic.to_vec()).unwrap(),
                f.publish.payload.to_vec(),
            )),
            Notification::Unschedule => rx.ready().unwrap(),
            _ => {}
        }
    }
    got.sort();
    got
}

fn pair(topic: &str, payload: &[u8]) -> (String, Vec<u8>) {
    (topic.to_string(), payload.to_vec())
}

#[test]
fn exact_and_wildcard_filters_match_in_any_order() {
    let link = router();
    let (mut publisher, _prx) = link("publisher");
    // Subscribed before the topics exist.
    let (mut early_exact, mut early_exact_rx) = link("early-exact");
    early_exact.subscribe("/tenants/A/cmd").unwrap();
    let (mut early_wild, mut early_wild_rx) = link("early-wild");
    early_wild.subscribe("/tenants/+/cmd").unwrap();
    std::thread::sleep(Duration::from_millis(100));

    publisher.publish("/tenants/A/cmd", b"1".to_vec()).unwrap();
    publisher.publish("/tenants/B/cmd", b"2".to_vec()).unwrap();
    publisher
        .publish("/tenants/A/report", b"3".to_vec())
        .unwrap();
    let wait = Duration::from_millis(500);
    assert_eq!(
        drain(&mut early_exact_rx, wait),
        vec![pair("/tenants/A/cmd", b"1")]
    );
    assert_eq!(
        drain(&mut early_wild_rx, wait),
        vec![pair("/tenants/A/cmd", b"1"), pair("/tenants/B/cmd", b"2")]
    );

    // Subscribed after the topics were first published (and cached by the router).
    let (mut late_exact, mut late_exact_rx) = link("late-exact");
    late_exact.subscribe("/tenants/B/cmd").unwrap();
    let (mut late_wild, mut late_wild_rx) = link("late-wild");
    late_wild.subscribe("/tenants/A/#").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    publisher.publish("/tenants/A/cmd", b"4".to_vec()).unwrap();
    publisher.publish("/tenants/B/cmd", b"5".to_vec()).unwrap();
    publisher
        .publish("/tenants/A/report", b"6".to_vec())
        .unwrap();
    assert_eq!(
        drain(&mut late_exact_rx, wait),
        vec![pair("/tenants/B/cmd", b"5")]
    );
    assert_eq!(
        drain(&mut late_wild_rx, wait),
        vec![
            pair("/tenants/A/cmd", b"4"),
            pair("/tenants/A/report", b"6")
        ]
    );
    assert_eq!(
        drain(&mut early_exact_rx, wait),
        vec![pair("/tenants/A/cmd", b"4")]
    );
}

#[tokio::test]
async fn retained_messages_reach_exact_and_wildcard_subscribers() {
    let link = router();
    let (mut publisher, _prx) = link("publisher");
    publisher
        .publish("/tenants/A/cmd", b"old".to_vec())
        .unwrap();
    // Retained: a local link publishes through `send` with the retain flag.
    for (topic, payload) in [("/tenants/A/cmd", "a"), ("/tenants/B/cmd", "b")] {
        let p = rumqttd::protocol::Publish::new(topic, payload, true);
        publisher
            .send(rumqttd::protocol::Packet::Publish(p, None))
            .await
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));
    let (mut exact, mut exact_rx) = link("exact");
    exact.subscribe("/tenants/B/cmd").unwrap();
    let (mut wild, mut wild_rx) = link("wild");
    wild.subscribe("/tenants/+/cmd").unwrap();
    let (mut none, mut none_rx) = link("none");
    none.subscribe("/tenants/C/cmd").unwrap();
    let wait = Duration::from_millis(500);
    assert_eq!(
        drain(&mut exact_rx, wait),
        vec![pair("/tenants/B/cmd", b"b")]
    );
    assert_eq!(
        drain(&mut wild_rx, wait),
        vec![pair("/tenants/A/cmd", b"a"), pair("/tenants/B/cmd", b"b")]
    );
    assert_eq!(drain(&mut none_rx, wait), vec![]);
}
