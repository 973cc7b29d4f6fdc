//! A car handed a backlog of redelivered QoS 1 commands acknowledges every one, in order.
//!
//! The broker here is a scripted MQTT 3.1.1 peer on a local socket, so the run is the same
//! every time: the car under test is the real one (`caas_sim::car::run_car`, its rumqttc
//! client and the agent core). The first connection takes the car's SUBSCRIBE and its
//! `online` publish and acknowledges neither, then drops; so the car comes back with a
//! publish of its own to resend (rumqttc's `pending`), which turns off its direct write.
//! The second connection resumes the session and sends, in one write with the CONNACK, a
//! backlog of [`BACKLOG`] command publishes (flagged as redeliveries), more than the car's
//! request channel holds ([`caas_sim::car::CLIENT_QUEUE`]), as Mosquitto does after a
//! restart. The test then waits for a PUBACK for each, in the order they were sent.
//!
//! This is what a soak on Mosquitto with broker kills found: acknowledgements went through
//! the client's bounded channel and were dropped when it was full, so the broker kept the
//! commands and resent them at every reconnect, for ever.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use caas_protocol::{topics, FirmwareVersion};
use caas_sim::car::{
    car_key, car_vin, run_car, seed_catalog, CarShared, CarSpec, FleetContext, Pacer, CLIENT_QUEUE,
};
use caas_sim::faults::CarFaults;
use caas_sim::stats::FleetStats;
use rumqttc::mqttbytes::{self, v4::Packet};
use rumqttc::{ConnAck, ConnectReturnCode, PubAck, Publish, QoS, SubAck, SubscribeReasonCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

/// Commands in the redelivered backlog: several times the client's channel.
const BACKLOG: u16 = 48;
/// Largest packet the scripted broker reads.
const MAX_PACKET: usize = 64 * 1024;
/// Longest the test waits for one step.
const STEP: Duration = Duration::from_secs(15);

/// One connection of the scripted broker.
struct Peer {
    stream: TcpStream,
    buf: BytesMut,
}

impl Peer {
    /// The next packet from the car; `None` when it closed the connection or `until` passed.
    async fn next(&mut self, until: Instant) -> Option<Packet> {
        loop {
            match Packet::read(&mut self.buf, MAX_PACKET) {
                Ok(p) => return Some(p),
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("car sent a malformed packet: {e}"),
            }
            let left = until.checked_duration_since(Instant::now())?;
            match tokio::time::timeout(left, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        }
    }

    async fn send(&mut self, packets: &[Packet]) {
        let mut out = BytesMut::new();
        for p in packets {
            p.write(&mut out, MAX_PACKET).expect("encodable packet");
        }
        self.stream.write_all(&out).await.expect("write to car");
    }
}

async fn accept(listener: &TcpListener) -> Peer {
    let (stream, _) = tokio::time::timeout(STEP, listener.accept())
        .await
        .expect("car connects in time")
        .expect("accept");
    let mut peer = Peer {
        stream,
        buf: BytesMut::new(),
    };
    match peer.next(Instant::now() + STEP).await {
        Some(Packet::Connect(c)) => assert!(!c.clean_session, "a car keeps its session"),
        other => panic!("expected CONNECT, got {other:?}"),
    }
    peer
}

#[tokio::test]
async fn a_redelivered_backlog_is_acknowledged_in_full_and_in_order() {
    // A network delay, as the soak's fleet B has (shorter, for the test's time).
    backlog_is_acknowledged(CarFaults::default(), Some(Duration::from_millis(20))).await;
}

#[tokio::test]
async fn a_backlog_of_dropped_commands_is_acknowledged_in_full_and_in_order() {
    // The drop fault acknowledges a command without handling it: those PUBACKs are owed too.
    let faults = CarFaults {
        drop: Some(None),
        ..CarFaults::default()
    };
    backlog_is_acknowledged(faults, None).await;
}

/// Runs a car with `faults` and `net_delay` through the two connections of the module docs
/// and asserts it acknowledges the whole backlog, in order.
async fn backlog_is_acknowledged(faults: CarFaults, net_delay: Option<Duration>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (stop_tx, stop_rx) = watch::channel(false);
    let stats = Arc::new(FleetStats::default());
    let ctx = Arc::new(FleetContext {
        brokers: vec![("127.0.0.1".to_string(), port)],
        trusted: heapless::Vec::new(),
        platform: seed_catalog(),
        firmware: FirmwareVersion::new("sim-test").expect("version"),
        report_interval_secs: 0,
        keep_alive: Duration::from_secs(60),
        stats: stats.clone(),
        connect_gate: Arc::new(Semaphore::new(1)),
        pacer: Pacer::new(0),
        corrupt: 0.0,
        net_delay,
        shutdown: stop_rx,
        epoch: Instant::now(),
    });
    let vin = car_vin("SMVTST", 1).expect("vin");
    let spec = CarSpec {
        vin,
        key: car_key(1, 1),
        faults,
        shared: Arc::new(CarShared::new(&faults)),
        broker_slot: 0,
    };
    let car = tokio::spawn(run_car(spec, ctx));
    let command_topic = topics::command_topic(&vin).as_str().to_string();

    // First connection: take the car's SUBSCRIBE and a publish of its own, acknowledge
    // nothing, drop the connection.
    let mut first = accept(&listener).await;
    first
        .send(&[Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            false,
        ))])
        .await;
    let until = Instant::now() + STEP;
    let (mut subscribed, mut published) = (false, false);
    while !(subscribed && published) {
        match first.next(until).await {
            Some(Packet::Subscribe(_)) => subscribed = true,
            Some(Packet::Publish(p)) if p.qos == QoS::AtLeastOnce => published = true,
            Some(_) => {}
            None => panic!("car sent no SUBSCRIBE and publish on its first connection"),
        }
    }
    drop(first);

    // Second connection: the session is resumed and the backlog comes at once.
    let mut second = accept(&listener).await;
    let mut burst = vec![Packet::ConnAck(ConnAck::new(
        ConnectReturnCode::Success,
        true,
    ))];
    for pkid in 1..=BACKLOG {
        let mut p = Publish::new(
            command_topic.as_str(),
            QoS::AtLeastOnce,
            format!("not a command {pkid}").into_bytes(),
        );
        p.pkid = pkid;
        p.dup = true;
        burst.push(Packet::Publish(p));
    }
    assert!(usize::from(BACKLOG) > 2 * CLIENT_QUEUE);
    second.send(&burst).await;

    // Every command is acknowledged, in the order sent; the car's own publishes and
    // subscriptions are acknowledged as a broker would.
    let mut acked = Vec::new();
    let until = Instant::now() + STEP;
    while acked.len() < usize::from(BACKLOG) {
        match second.next(until).await {
            Some(Packet::PubAck(a)) => acked.push(a.pkid),
            Some(Packet::Publish(p)) if p.qos == QoS::AtLeastOnce => {
                second.send(&[Packet::PubAck(PubAck::new(p.pkid))]).await;
            }
            Some(Packet::Subscribe(s)) => {
                let codes = s
                    .filters
                    .iter()
                    .map(|_| SubscribeReasonCode::Success(QoS::AtLeastOnce))
                    .collect();
                second
                    .send(&[Packet::SubAck(SubAck::new(s.pkid, codes))])
                    .await;
            }
            Some(Packet::PingReq) => second.send(&[Packet::PingResp]).await,
            Some(_) => {}
            None => break,
        }
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(STEP, car).await;
    let expected: Vec<u16> = (1..=BACKLOG).collect();
    assert_eq!(
        acked,
        expected,
        "PUBACKs for the backlog (client queue full {} times)",
        stats
            .client_queue_full
            .load(std::sync::atomic::Ordering::Relaxed)
    );
}
