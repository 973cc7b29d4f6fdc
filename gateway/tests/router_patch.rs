//! The vendored rumqttd's routing patch (vendor/rumqttd/PATCHES.md) keeps MQTT's matching
//! rules: exact filters are looked up instead of scanned, wildcard filters are still matched,
//! whatever the order of subscribing and first publishing, and retained messages reach exact
//! and wildcard subscribers alike; and a reader that follows a log whose segments are dropped
//! behind it gets every message without a warning (patch 7).
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
    router_with(router_config())
}

/// [`router`] with the given configuration.
fn router_with(config: rumqttd::RouterConfig) -> impl Fn(&str) -> (LinkTx, LinkRx) {
    let router_tx = rumqttd::Router::new(0, config).spawn();
    move |name| {
        let (tx, rx, _) = LinkBuilder::new(name, router_tx.clone()).build().unwrap();
        (tx, rx)
    }
}

/// Receives until `rx` has as many messages as `expected` (waiting up to 30 s, as a loaded
/// machine may be slow), then 200 ms more for any message that should not come, and
/// compares, in any order.
fn expect(rx: &mut LinkRx, expected: &[(&str, &str)]) {
    let mut end = Instant::now() + Duration::from_secs(30);
    let mut got = Vec::new();
    let mut settling = false;
    loop {
        if !settling && got.len() >= expected.len() {
            settling = true;
            end = Instant::now() + Duration::from_millis(200);
        }
        match next_forward(rx, end) {
            Some(message) => got.push(message),
            None => break,
        }
    }
    got.sort();
    let mut expected: Vec<(String, Vec<u8>)> = expected
        .iter()
        .map(|(t, p)| (t.to_string(), p.as_bytes().to_vec()))
        .collect();
    expected.sort();
    assert_eq!(got, expected);
}

/// The next forwarded message, as topic and payload, or `None` once `end` has passed.
fn next_forward(rx: &mut LinkRx, end: Instant) -> Option<(String, Vec<u8>)> {
    loop {
        match rx.recv_deadline(end) {
            Ok(Some(Notification::Forward(f))) => {
                return Some((
                    String::from_utf8(f.publish.topic.to_vec()).unwrap(),
                    f.publish.payload.to_vec(),
                ))
            }
            Ok(Some(Notification::Unschedule)) => rx.ready().unwrap(),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

/// Subscribes and waits for the router's SubAck, so a publish sent afterwards is matched
/// against the new filter whatever the machine's load (a fixed sleep was not enough).
fn subscribe(tx: &mut LinkTx, rx: &mut LinkRx, filter: &str) {
    tx.subscribe(filter).unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        match rx.recv_deadline(end) {
            Ok(Some(Notification::DeviceAck(_))) => return,
            Ok(Some(Notification::Unschedule)) => rx.ready().unwrap(),
            Ok(_) => {}
            Err(e) => panic!("no SubAck for {filter}: {e:?}"),
        }
    }
}

#[test]
fn exact_and_wildcard_filters_match_in_any_order() {
    let link = router();
    let (mut publisher, _prx) = link("publisher");
    // Subscribed before the topics exist.
    let (mut early_exact, mut early_exact_rx) = link("early-exact");
    subscribe(&mut early_exact, &mut early_exact_rx, "/tenants/A/cmd");
    let (mut early_wild, mut early_wild_rx) = link("early-wild");
    subscribe(&mut early_wild, &mut early_wild_rx, "/tenants/+/cmd");

    publisher.publish("/tenants/A/cmd", b"1".to_vec()).unwrap();
    publisher.publish("/tenants/B/cmd", b"2".to_vec()).unwrap();
    publisher
        .publish("/tenants/A/report", b"3".to_vec())
        .unwrap();
    expect(&mut early_exact_rx, &[("/tenants/A/cmd", "1")]);
    expect(
        &mut early_wild_rx,
        &[("/tenants/A/cmd", "1"), ("/tenants/B/cmd", "2")],
    );

    // Subscribed after the topics were first published (and cached by the router).
    let (mut late_exact, mut late_exact_rx) = link("late-exact");
    subscribe(&mut late_exact, &mut late_exact_rx, "/tenants/B/cmd");
    let (mut late_wild, mut late_wild_rx) = link("late-wild");
    subscribe(&mut late_wild, &mut late_wild_rx, "/tenants/A/#");
    publisher.publish("/tenants/A/cmd", b"4".to_vec()).unwrap();
    publisher.publish("/tenants/B/cmd", b"5".to_vec()).unwrap();
    publisher
        .publish("/tenants/A/report", b"6".to_vec())
        .unwrap();
    expect(&mut late_exact_rx, &[("/tenants/B/cmd", "5")]);
    expect(
        &mut late_wild_rx,
        &[("/tenants/A/cmd", "4"), ("/tenants/A/report", "6")],
    );
    expect(&mut early_exact_rx, &[("/tenants/A/cmd", "4")]);
}

#[tokio::test]
async fn retained_messages_reach_exact_and_wildcard_subscribers() {
    let link = router();
    let (mut publisher, _prx) = link("publisher");
    // Sees every publish, so the test knows when the router has stored the retained ones.
    let (mut probe, mut probe_rx) = link("probe");
    subscribe(&mut probe, &mut probe_rx, "/tenants/+/cmd");
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
    expect(
        &mut probe_rx,
        &[
            ("/tenants/A/cmd", "old"),
            ("/tenants/A/cmd", "a"),
            ("/tenants/B/cmd", "b"),
        ],
    );
    let (mut exact, mut exact_rx) = link("exact");
    exact.subscribe("/tenants/B/cmd").unwrap();
    let (mut wild, mut wild_rx) = link("wild");
    wild.subscribe("/tenants/+/cmd").unwrap();
    let (mut none, mut none_rx) = link("none");
    none.subscribe("/tenants/C/cmd").unwrap();
    expect(&mut exact_rx, &[("/tenants/B/cmd", "b")]);
    expect(
        &mut wild_rx,
        &[("/tenants/A/cmd", "a"), ("/tenants/B/cmd", "b")],
    );
    expect(&mut none_rx, &[]);
}

/// What the process logs, kept in memory.
#[derive(Clone, Default)]
struct CapturedLog(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for CapturedLog {
    type Writer = CapturedLog;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// rumqttd patch 7: a car's command log keeps one small segment, so the router drops the
/// segment a car has just read on nearly every command. A reader that had read all of it is
/// moved on without a warning (upstream logged two warnings and an alert per command, ~4,000
/// log lines a second at 4,000 activations/s), and every message still arrives, in order.
#[test]
fn a_caught_up_reader_follows_dropped_segments_without_a_warning() {
    let log = CapturedLog::default();
    // The only test of this binary that sets the process's subscriber.
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_writer(log.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish(),
    )
    .unwrap();
    // The gateway's per-car settings (gateway/src/mqtt.rs: one segment of 1 KiB).
    let link = router_with(rumqttd::RouterConfig {
        max_segment_size: 1024,
        max_segment_count: 1,
        ..router_config()
    });
    let (mut publisher, _prx) = link("publisher");
    let (mut car, mut car_rx) = link("car");
    subscribe(&mut car, &mut car_rx, "/tenants/C/cmd");
    // 40 commands of 300 bytes: the segment is dropped every few of them.
    for i in 0..40u8 {
        let payload = vec![i; 300];
        publisher
            .publish("/tenants/C/cmd", payload.clone())
            .unwrap();
        assert_eq!(
            next_forward(&mut car_rx, Instant::now() + Duration::from_secs(30)),
            Some(("/tenants/C/cmd".to_owned(), payload)),
            "command {i}"
        );
    }
    let logged = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    assert!(!logged.contains("jump"), "logged:\n{logged}");
}
