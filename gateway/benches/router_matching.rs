//! Measures rumqttd's topic matching over a fleet (issue 4: "rumqttd checks the first
//! publish on each new topic against every subscription"). Prints a table; no assertions.
//!
//! For N cars it builds rumqttd's router with one in-process link per car subscribed to its
//! own `/tenants/{VIN}/cmd` (as cars do) and the gateway's link subscribed to
//! `/tenants/+/report`, then times: subscribing the N filters (each new filter is matched
//! against every topic seen so far), the first round of N reports (each new topic is matched
//! against every filter), the first round of N commands, and a second round of each
//! (cached). Run: `cargo bench -p caas-gateway --bench router_matching`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::Notification;

fn router_config() -> rumqttd::RouterConfig {
    rumqttd::RouterConfig {
        max_connections: 1 << 20,
        max_outgoing_packet_count: 1024,
        max_segment_size: 4 * 1024 * 1024,
        max_segment_count: 4,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    }
}

/// Publishes a sentinel the gateway link receives; every earlier publish of `tx` has then
/// been matched and appended by the router.
fn barrier(tx: &mut LinkTx, rx: &mut LinkRx, tag: &str) {
    let topic = format!("/tenants/SENTINEL{tag}/report");
    tx.publish(topic.clone(), b"x".to_vec()).unwrap();
    let end = Instant::now() + Duration::from_secs(600);
    loop {
        match rx.recv_deadline(end) {
            Ok(Some(Notification::Forward(f))) if f.publish.topic == topic.as_bytes() => return,
            Ok(Some(Notification::Unschedule)) => rx.ready().unwrap(),
            Ok(_) => {}
            Err(e) => panic!("barrier: {e}"),
        }
    }
}

fn run(n: usize) -> [Duration; 5] {
    let router = rumqttd::Router::new(0, router_config());
    let router_tx = router.spawn();
    let (mut gw_tx, mut gw_rx, _) = rumqttd::local::LinkBuilder::new("gw", router_tx.clone())
        .build()
        .unwrap();
    gw_tx.subscribe("/tenants/+/report").unwrap();
    barrier(&mut gw_tx, &mut gw_rx, "0");
    let vins: Vec<String> = (0..n).map(|i| format!("WVWZZZ1JZXW{i:06}")).collect();
    let mut cars = Vec::with_capacity(n);
    let t = Instant::now();
    for v in &vins {
        let (mut tx, rx, _) = rumqttd::local::LinkBuilder::new(v, router_tx.clone())
            .build()
            .unwrap();
        tx.subscribe(format!("/tenants/{v}/cmd")).unwrap();
        cars.push((tx, rx));
    }
    barrier(&mut gw_tx, &mut gw_rx, "1");
    let subscribe = t.elapsed();
    let mut rounds = [Duration::ZERO; 4];
    for (r, slot) in rounds.iter_mut().enumerate() {
        let t = Instant::now();
        if r % 2 == 0 {
            // Reports: each car publishes on its own report topic.
            for (i, (tx, _)) in cars.iter_mut().enumerate() {
                tx.publish(format!("/tenants/{}/report", vins[i]), vec![0u8; 150])
                    .unwrap();
            }
            // Drain what the gateway link got (N reports) before the barrier.
        } else {
            for v in &vins {
                gw_tx
                    .publish(format!("/tenants/{v}/cmd"), vec![0u8; 200])
                    .unwrap();
            }
        }
        barrier(&mut gw_tx, &mut gw_rx, &format!("r{r}"));
        *slot = t.elapsed();
    }
    [subscribe, rounds[0], rounds[1], rounds[2], rounds[3]]
}

fn main() {
    println!(
        "| cars | subscribe N filters | 1st reports | 1st commands | 2nd reports | 2nd commands |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for n in [1_000, 2_000, 4_000, 8_000, 19_000, 40_000] {
        let r = run(n);
        let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1e3);
        println!(
            "| {n} | {} | {} | {} | {} | {} |",
            ms(r[0]),
            ms(r[1]),
            ms(r[2]),
            ms(r[3]),
            ms(r[4])
        );
    }
}
