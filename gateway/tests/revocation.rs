//! Car certificate revocation on the embedded broker's mTLS listener (`--tls-crl`): a revoked
//! certificate fails the handshake, a changed list closes the live connections it newly
//! revokes and leaves every other car alone, a list that does not load leaves the one in
//! force in force, and a list no trusted CA signed stops the start.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Transport};

/// Long enough for anything here on a loaded machine: the list is polled every 2 s.
const SETTLED_WITHIN: Duration = Duration::from_secs(15);

/// Whether a client with `tls` gets a CONNACK on the mTLS port (false: the connection failed).
async fn connects(client_id: &str, port: u16, tls: Arc<rustls::ClientConfig>) -> bool {
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_transport(Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(tls),
    ));
    let (_client, mut el) = AsyncClient::new(opts, 4);
    let polled = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return true,
                Ok(_) => continue,
                Err(_) => return false,
            }
        }
    })
    .await;
    polled.expect("neither a CONNACK nor an error within 10 s")
}

async fn wait_metric_at_least(api: &Api, name: &str, value: f64) -> f64 {
    let end = Instant::now() + SETTLED_WITHIN;
    loop {
        let now = api.metric(name).await;
        if now >= value {
            return now;
        }
        assert!(Instant::now() < end, "{name} is {now}, not {value}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_car_certificate_is_refused_and_its_live_connection_closed() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    // Issued once each: every `car(n)` call issues a new certificate.
    let car1_tls = pki.car(1);
    let car2_tls = pki.car(2);
    let crl = pki.write_crl(1, &[]);
    let hook = Webhook::start(0).await;
    let mut c = pki.with_mqtts(config(&dir.path().join("gw"), Some(&hook)));
    c.tls_crl = Some(crl);
    let (gw, port, api) = start_mqtts(c).await;
    api.register(1).await;
    api.register(2).await;
    assert_eq!(api.metric("caas_mqtts_crl_entries").await, 0.0);

    let opts = |tls: &Arc<rustls::ClientConfig>| CarOpts {
        host: "127.0.0.1".into(),
        port,
        tls: Some(tls.clone()),
        mode: Mode::Obey,
    };
    let car1 = TestCar::start(1, gw.public_key_hex(), opts(&car1_tls)).await;
    let car2 = TestCar::start(2, gw.public_key_hex(), opts(&car2_tls)).await;
    car1.wait_connected().await;
    car2.wait_connected().await;
    let id = api.activate(1, "power-boost", "power_boost").await;
    assert_eq!(
        hook.wait(&id, SETTLED_WITHIN).await.body["status"],
        "ACTIVATED",
        "car 1 works before its certificate is revoked"
    );
    wait_status(&api, 1, "car 1 online", SETTLED_WITHIN, |st| {
        st["connectivity"] == "ONLINE"
    })
    .await;

    // Car 1's unit is reported stolen: its certificate goes on the list.
    pki.write_crl(2, &["car1"]);
    wait_metric_at_least(&api, "caas_mqtts_revoked_closed_total", 1.0).await;
    assert_eq!(api.metric("caas_mqtts_crl_entries").await, 1.0);
    assert_eq!(
        api.metric("caas_mqtts_revoked_closed_total").await,
        1.0,
        "only car 1's connection was closed"
    );
    wait_status(&api, 1, "car 1 offline", SETTLED_WITHIN, |st| {
        st["connectivity"] == "OFFLINE"
    })
    .await;
    // Its test car keeps reconnecting every 200 ms, and each handshake is refused.
    wait_metric_at_least(&api, "caas_mqtts_revoked_refused_total", 1.0).await;
    assert!(
        !connects("revoked", port, car1_tls.clone()).await,
        "a revoked certificate got a session"
    );
    assert!(!car1.connected.load(std::sync::atomic::Ordering::SeqCst));

    // Car 2 was never touched: its session lives on and its commands get through.
    assert!(car2.connected.load(std::sync::atomic::Ordering::SeqCst));
    let id = api.activate(2, "snow-mode", "snow_mode").await;
    assert_eq!(
        hook.wait(&id, SETTLED_WITHIN).await.body["status"],
        "ACTIVATED"
    );
    wait_status(&api, 2, "car 2 online", SETTLED_WITHIN, |st| {
        st["connectivity"] == "ONLINE"
    })
    .await;

    // A list caught half-written (or not a list at all) is not taken: car 1 stays revoked.
    let failures = api.metric("caas_mqtts_crl_failures_total").await;
    std::fs::write(
        dir.path().join("crl.pem"),
        "-----BEGIN X509 CRL-----\ngarbage",
    )
    .unwrap();
    wait_metric_at_least(&api, "caas_mqtts_crl_failures_total", failures + 1.0).await;
    assert_eq!(api.metric("caas_mqtts_crl_entries").await, 1.0);
    assert!(!connects("revoked-again", port, car1_tls.clone()).await);
    assert!(connects("car2-again", port, car2_tls.clone()).await);

    // A new unit for car 1 gets a new certificate, which the list does not name.
    let car1_new_tls = pki.car(1);
    assert!(connects("new-unit", port, car1_new_tls).await);
    drop((car1, car2));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_list_no_trusted_ca_signed_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let other_dir = tempfile::tempdir().unwrap();
    let other = Pki::new(other_dir.path());
    let foreign = other.write_crl(1, &[]);
    let mut c = pki.with_mqtts(config(&dir.path().join("gw"), None));
    c.tls_crl = Some(foreign);
    let err = match caas_gateway::start(c).await {
        Ok(_) => panic!("a gateway started with another CA's revocation list"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("not signed by a CA of --tls-ca"),
        "unexpected error: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_with_the_shipped_config_refuses_a_revoked_car() {
    if !mosquitto_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let car1_tls = pki.car(1);
    let car2_tls = pki.car(2);
    pki.write_crl(1, &["car1"]);
    let port = free_port();
    let _m = start_shipped_mosquitto(dir.path(), port).await;
    let vin1 = vin(1).to_string();
    let vin2 = vin(2).to_string();
    assert!(
        !connects(&vin1, port, car1_tls).await,
        "Mosquitto gave a revoked certificate a session"
    );
    assert!(
        connects(&vin2, port, car2_tls).await,
        "a certificate the list does not name was refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_broker_certificate_is_served_without_a_restart_and_cars_stay_connected() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let car1_tls = pki.car(1);
    let car2_tls = pki.car(2);
    let hook = Webhook::start(0).await;
    let (gw, port, api) =
        start_mqtts(pki.with_mqtts(config(&dir.path().join("gw"), Some(&hook)))).await;
    api.register(1).await;
    let car1 = TestCar::start(
        1,
        gw.public_key_hex(),
        CarOpts {
            host: "127.0.0.1".into(),
            port,
            tls: Some(car1_tls.clone()),
            mode: Mode::Obey,
        },
    )
    .await;
    car1.wait_connected().await;
    let first = pki.cert_der("server");
    assert_eq!(presented_cert(port, car2_tls.clone()).await, first);

    let renewed = renew_server_cert(&pki, "server").await;
    wait_presented(port, car2_tls.clone(), &first, &renewed).await;
    assert!(api.metric("caas_mqtts_cert_reloads_total").await >= 1.0);
    assert!(
        api.metric("caas_mqtts_cert_reload_failures_total").await >= 1.0,
        "the mismatched pair between the renames was refused"
    );
    // Car 1 kept the connection it made with the old certificate; its commands get through.
    assert!(car1.connected.load(std::sync::atomic::Ordering::SeqCst));
    let id = api.activate(1, "power-boost", "power_boost").await;
    assert_eq!(
        hook.wait(&id, SETTLED_WITHIN).await.body["status"],
        "ACTIVATED"
    );
    assert!(connects("car2-after-renewal", port, car2_tls).await);
    drop(car1);
    gw.shutdown().await;
}
