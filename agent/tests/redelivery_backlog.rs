//! The agent handed a backlog of redelivered QoS 1 commands acknowledges every one, in order.
//!
//! The broker here is a scripted MQTT 3.1.1 peer on a local socket, so the run is the same
//! every time; the agent under test is the real `caas-agent` binary (its runtime, rumqttc
//! client and sled store). The first connection takes the agent's SUBSCRIBE and its `online`
//! publish and acknowledges neither, then drops; so the agent comes back with publishes of
//! its own to resend (rumqttc's `pending`). The second connection resumes the session and
//! sends, in one write with the CONNACK, a backlog of [`BACKLOG`] validly signed commands
//! (flagged as redeliveries), more than the agent's request channel holds
//! ([`caas_agent::runtime::REQUEST_QUEUE`]), as Mosquitto does after a restart. The test
//! then waits for a PUBACK for each, in the order they were sent.
//!
//! This guards against what the fleet simulator's car had (fixed in the simulator in
//! 57fbbea): acknowledgements queued with `try_ack` into the client's bounded channel were
//! dropped when it was full, while the event loop was busy handing out the backlog, so the
//! broker kept the commands and resent them at every reconnect, for ever.
//!
//! The packets are encoded and decoded by hand (only the few this exchange needs): the
//! agent crate does not depend on `bytes`, which rumqttc's own codec takes.
#![cfg(feature = "std")]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::PathBuf;
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use caas_agent::runtime::REQUEST_QUEUE;
use caas_protocol::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const VIN: &str = "WVWZZZ1JZXW000001";
/// Commands in the redelivered backlog: more than twice the client's request channel.
const BACKLOG: u16 = 150;
/// Longest the test waits for one step.
const STEP: Duration = Duration::from_secs(30);

/// The packets of MQTT 3.1.1 this exchange uses, as the agent sends them.
#[derive(Debug)]
enum Packet {
    Connect { clean_session: bool },
    Publish { qos: u8, pkid: u16 },
    PubAck { pkid: u16 },
    Subscribe { pkid: u16 },
    PingReq,
    Other,
}

fn pkid_at(body: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([body[at], body[at + 1]])
}

/// Decodes one packet from the front of `buf`, removing it; `None` when incomplete.
fn decode(buf: &mut Vec<u8>) -> Option<Packet> {
    let first = *buf.first()?;
    let (mut len, mut shift, mut at) = (0usize, 0u32, 1usize);
    loop {
        let b = *buf.get(at)?;
        len |= usize::from(b & 0x7f) << shift;
        at += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        assert!(shift <= 21, "malformed remaining length");
    }
    if buf.len() < at + len {
        return None;
    }
    let body: Vec<u8> = buf[at..at + len].to_vec();
    buf.drain(..at + len);
    Some(match first >> 4 {
        1 => {
            // Protocol name (length-prefixed), level, then the connect flags.
            let name = usize::from(pkid_at(&body, 0));
            Packet::Connect {
                clean_session: body[2 + name + 1] & 0x02 != 0,
            }
        }
        3 => {
            let qos = (first >> 1) & 0x03;
            let topic = usize::from(pkid_at(&body, 0));
            let pkid = if qos > 0 {
                pkid_at(&body, 2 + topic)
            } else {
                0
            };
            Packet::Publish { qos, pkid }
        }
        4 => Packet::PubAck {
            pkid: pkid_at(&body, 0),
        },
        8 => Packet::Subscribe {
            pkid: pkid_at(&body, 0),
        },
        12 => Packet::PingReq,
        _ => Packet::Other,
    })
}

fn remaining_length(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            return;
        }
    }
}

fn connack(session_present: bool) -> Vec<u8> {
    vec![0x20, 2, u8::from(session_present), 0]
}

fn puback(pkid: u16) -> Vec<u8> {
    let [hi, lo] = pkid.to_be_bytes();
    vec![0x40, 2, hi, lo]
}

fn suback(pkid: u16) -> Vec<u8> {
    let [hi, lo] = pkid.to_be_bytes();
    vec![0x90, 3, hi, lo, 1]
}

/// A QoS 1 publish flagged as a redelivery (DUP).
fn redelivered_publish(topic: &str, pkid: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&u16::try_from(topic.len()).unwrap().to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&pkid.to_be_bytes());
    body.extend_from_slice(payload);
    let mut out = vec![0x30 | 0x08 | 0x02];
    remaining_length(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

/// One connection of the scripted broker.
struct Peer {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Peer {
    /// The next packet from the agent; `None` when it closed the connection or `until` passed.
    async fn next(&mut self, until: Instant) -> Option<Packet> {
        loop {
            if let Some(p) = decode(&mut self.buf) {
                return Some(p);
            }
            let left = until.checked_duration_since(Instant::now())?;
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout(left, self.stream.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write to agent");
    }
}

async fn accept(listener: &TcpListener) -> Peer {
    let (stream, _) = tokio::time::timeout(STEP, listener.accept())
        .await
        .expect("agent connects in time")
        .expect("accept");
    let mut peer = Peer {
        stream,
        buf: Vec::new(),
    };
    match peer.next(Instant::now() + STEP).await {
        Some(Packet::Connect { clean_session }) => {
            assert!(!clean_session, "the agent keeps its session")
        }
        other => panic!("expected CONNECT, got {other:?}"),
    }
    peer
}

/// The agent's files: keys and data directory.
struct CarFiles {
    dir: tempfile::TempDir,
    gateway: SigningKey,
}

impl CarFiles {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let gateway = SigningKey::from_bytes(&[11; 32]);
        let device = SigningKey::from_bytes(&[12; 32]);
        files::write_verifying_key(&dir.path().join("gateway.pub"), &gateway.verifying_key())
            .unwrap();
        files::write_signing_key(&dir.path().join("device.key"), &device).unwrap();
        CarFiles { dir, gateway }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn spawn(&self, port: u16) -> Child {
        let p = |n: &str| self.path(n).display().to_string();
        let log = std::fs::File::create(self.path("agent.log")).unwrap();
        Process::new(env!("CARGO_BIN_EXE_caas-agent"))
            .args(["run", "--vin", VIN, "--broker"])
            .arg(format!("mqtt://127.0.0.1:{port}"))
            .args(["--gateway-key", &p("gateway.pub")])
            .args(["--device-key", &p("device.key")])
            .args(["--data", &p("data")])
            .stdout(Stdio::null())
            .stderr(log)
            .env("RUST_LOG", "info")
            .spawn()
            .unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("agent.log")).unwrap_or_default()
    }
}

/// A signed command switching a boost on, with sequence number `seq`.
fn boost(seq: u64, key: &SigningKey) -> Vec<u8> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut g = Grant::new("power-boost".parse().unwrap());
    g.flags.push("power_boost".parse().unwrap()).unwrap();
    g.ends_at = Some(now + 86_400);
    let mut desired = DesiredState::default();
    desired.grants.push(g).unwrap();
    let cmd = Command {
        vin: VIN.parse().unwrap(),
        seq,
        issued_at: now,
        not_after: now + 600,
        body: CommandBody::SetState(desired),
    };
    let mut buf = [0u8; MAX_COMMAND_FRAME_SIZE];
    seal_command(&cmd, key, &mut buf).unwrap().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_backlog_is_acknowledged_in_full_and_in_order() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let car = CarFiles::new();
    let mut agent = car.spawn(port);
    let vin: Vin = VIN.parse().unwrap();
    let command_topic = topics::command_topic(&vin).as_str().to_string();

    // First connection: take the agent's SUBSCRIBE and a publish of its own, acknowledge
    // nothing, drop the connection.
    let mut first = accept(&listener).await;
    first.send(&connack(false)).await;
    let until = Instant::now() + STEP;
    let (mut subscribed, mut published) = (false, false);
    while !(subscribed && published) {
        match first.next(until).await {
            Some(Packet::Subscribe { .. }) => subscribed = true,
            Some(Packet::Publish { qos: 1, .. }) => published = true,
            Some(_) => {}
            None => panic!(
                "agent sent no SUBSCRIBE and publish on its first connection:\n{}",
                car.log()
            ),
        }
    }
    drop(first);

    // Second connection: the session is resumed and the backlog comes at once. Each
    // command is new (seqs 1..=BACKLOG), so each is persisted, applied, acknowledged and
    // reported: an ack and a report per command.
    let mut second = accept(&listener).await;
    let mut burst = connack(true);
    for pkid in 1..=BACKLOG {
        let frame = boost(u64::from(pkid), &car.gateway);
        burst.extend(redelivered_publish(&command_topic, pkid, &frame));
    }
    assert!(usize::from(BACKLOG) > 2 * REQUEST_QUEUE);
    second.send(&burst).await;

    // Every command is acknowledged, in the order sent; the agent's own publishes and
    // subscriptions are acknowledged as a broker would.
    let mut acked = Vec::new();
    let until = Instant::now() + STEP;
    while acked.len() < usize::from(BACKLOG) {
        match second.next(until).await {
            Some(Packet::PubAck { pkid }) => acked.push(pkid),
            Some(Packet::Publish { qos: 1, pkid }) => second.send(&puback(pkid)).await,
            Some(Packet::Subscribe { pkid }) => second.send(&suback(pkid)).await,
            Some(Packet::PingReq) => second.send(&[0xd0, 0]).await,
            Some(_) => {}
            None => break,
        }
    }
    agent.kill().unwrap();
    agent.wait().unwrap();
    let log = car.log();
    let expected: Vec<u16> = (1..=BACKLOG).collect();
    assert_eq!(
        acked,
        expected,
        "PUBACKs for the backlog ({} acks could not be queued)",
        log.matches("could not queue the ack").count()
    );
}
