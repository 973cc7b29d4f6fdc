//! A store older than its cars: the data directory restored from a backup taken before the
//! car's last changes. The car's unit keeps the newest seq it applied and refuses every
//! seq up to it as a replay, and what it applied is nothing this store issued, so no
//! request may be settled by it: the gateway takes the car's seq up and sends its whole
//! state again above it.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const WITHIN: Duration = Duration::from_secs(20);

/// Copies the directory tree at `from` to `to` (which must not exist).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_restored_from_an_older_backup_confirms_nothing_the_car_did_not_apply() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gw");
    let backup = dir.path().join("backup");
    let hook = Webhook::start(0).await;
    let gateway_on = |data: &Path| config(data, Some(&hook));
    // The same unit at every start of the gateway, rebooted with its flash (an in-process
    // gateway's shutdown leaves its cars' connections to the old broker).
    let unit_on = |gw: &caas_gateway::Gateway, flash: Option<Vec<u8>>| {
        let (key, opts) = (car_key(1), CarOpts::plain(gw, Mode::Obey));
        let gateway_key = gw.public_key_hex().to_owned();
        async move {
            let car = TestCar::start_with_flash(1, key, &gateway_key, opts, flash).await;
            car.wait_connected().await;
            car
        }
    };
    let gw = caas_gateway::start(gateway_on(&data)).await.unwrap();
    let api = Api::new(gw.http_addr());
    api.register(1).await;
    let car = unit_on(&gw, None).await;
    let boost = api.activate(1, "power-boost", "power_boost").await;
    wait_activated(&hook, &[&boost], WITHIN).await;
    let flash = car.flash.lock().unwrap().clone();
    drop(car);
    gw.shutdown().await;
    // The operator's backup, taken while the gateway is stopped.
    copy_tree(&data, &backup);

    // Two more services after the backup: the car applies seq 3.
    let gw = caas_gateway::start(gateway_on(&data)).await.unwrap();
    let api = Api::new(gw.http_addr());
    let car = unit_on(&gw, flash).await;
    let snow = api.activate(1, "snow-mode", "snow_mode").await;
    let seats = api.activate(1, "heated-seats", "heated_seats").await;
    wait_activated(&hook, &[&snow, &seats], WITHIN).await;
    let car_seq_before_restore = car.seen.lock().unwrap().applied_seq;
    assert_eq!(
        car_services(&car),
        ["heated-seats", "power-boost", "snow-mode"]
    );
    let flash = car.flash.lock().unwrap().clone();
    drop(car);
    gw.shutdown().await;

    // The disk is lost and the backup restored: the store's newest seq is the first one.
    std::fs::remove_dir_all(&data).unwrap();
    copy_tree(&backup, &data);
    let gw = caas_gateway::start(gateway_on(&data)).await.unwrap();
    let api = Api::new(gw.http_addr());
    let car = unit_on(&gw, flash).await;
    let autopilot = api
        .activate(1, "highway-autopilot", "highway_autopilot")
        .await;
    let cb = hook.wait(&autopilot, WITHIN).await;
    assert_eq!(cb.body["status"], "ACTIVATED", "{}", cb.body);
    // ACTIVATED means the car has it: the car applied a seq above its own, carrying the
    // store's state (the services added after the backup are not in the store, so they go).
    let seen_applied = car.seen.lock().unwrap().applied_seq;
    assert!(
        seen_applied > car_seq_before_restore,
        "the car applied nothing new ({seen_applied}), yet the request was confirmed"
    );
    assert_eq!(car_services(&car), ["highway-autopilot", "power-boost"]);
    let st = wait_status(&api, 1, "both services active", WITHIN, |st| {
        st["activeServices"]
            .as_array()
            .is_some_and(|s| s.len() == 2 && s.iter().all(|s| s["status"] == "ACTIVE"))
    })
    .await;
    let mut ids: Vec<&str> = st["activeServices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["serviceId"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, ["highway-autopilot", "power-boost"]);
    assert_eq!(api.metric("caas_vehicle_seq_resyncs_total").await, 1.0);
    let commands = history_of(&api, 1, "COMMAND").await;
    let resyncs = commands
        .iter()
        .filter(|e| {
            e["detail"]
                .as_str()
                .is_some_and(|d| d.contains("above the newest this store issued"))
        })
        .count();
    assert_eq!(resyncs, 1, "{commands:?}");
    assert_eq!(hook.for_request(&autopilot).len(), 1, "one callback");
    drop(car);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impossible_applied_seq_moves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let gw = caas_gateway::start(config(&dir.path().join("gw"), Some(&hook)))
        .await
        .unwrap();
    let api = Api::new(gw.http_addr());
    api.register(1).await;
    let car = TestCar::start(1, gw.public_key_hex(), CarOpts::plain(&gw, Mode::Obey)).await;
    car.wait_connected().await;
    let boost = api.activate(1, "power-boost", "power_boost").await;
    wait_activated(&hook, &[&boost], WITHIN).await;
    // A report signed with the car's key (its key in the wrong hands can sign anything)
    // claiming a seq no command could have had: taking it up would bring the seq to overflow.
    let verified = api.metric("caas_reports_verified_total").await;
    let counter = caas_protocol::Outcome::Periodic { counter: 1 };
    send_report(&car, 1, u64::MAX, counter).await;
    let end = std::time::Instant::now() + WITHIN;
    while api.metric("caas_reports_verified_total").await <= verified {
        assert!(std::time::Instant::now() < end, "the report was not read");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(api.metric("caas_vehicle_seq_resyncs_total").await, 0.0);
    // The car's next command follows its last one.
    let seats = api.activate(1, "heated-seats", "heated_seats").await;
    wait_activated(&hook, &[&seats], WITHIN).await;
    let (_, request) = api.get(&format!("/ota/requests/{seats}")).await;
    assert_eq!(request["seq"], 2, "{request}");
    gw.shutdown().await;
}
