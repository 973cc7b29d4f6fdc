//! MQTT fan-out: the embedded rumqttd broker (default) or an external broker (rumqttc).
//!
//! The engine's flushers hand signed commands to a [`Publisher`]: straight into the embedded
//! routers, or into an external broker's client's request queue ([`OUT_QUEUE`]). Every car's
//! reports and presence reach the engine through [`route`].
//!
//! Embedded: we build rumqttd's routers ourselves (several, see [`start_embedded`]) and
//! attach the gateway to each as an in-process link without a tenant that subscribes
//! `/tenants/+/report` and `/tenants/+/presence`. rumqttd's listeners are not used: our
//! fronts ([`crate::tlsfront`]) accept the cars (plain and mTLS), set TCP_NODELAY, bound the
//! time to the first packet and hand each connection in-process to its VIN's router. (rumqttd's
//! own TLS listener runs every handshake inline in its accept loop, so one idle socket would
//! stall every other car.)

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use caas_protocol::topics::{self, TopicKind};
use caas_protocol::MAX_REPORT_FRAME_SIZE;
use rumqttd::protocol::{Packet, Publish};

use crate::config::{split_broker_url, Config};
use crate::engine::{Engine, Msg, Outbound};
use crate::metrics::Metrics;

/// Requests (our commands, and the client's own) waiting for an external broker's client's
/// event loop (rumqttc's request channel), by default (`--broker-queue`); a shard's flusher
/// waits when it is full.
pub(crate) const OUT_QUEUE: usize = 65_536;
/// Largest MQTT payload the embedded broker accepts (a report is far smaller).
const MAX_PAYLOAD: usize = 16 * 1024;
/// How long a connection may take to send CONNECT.
const CONNECT_TIMEOUT_MS: u16 = 10_000;

/// What one received message means for the engine (`None`: ignore it).
pub(crate) fn route(
    metrics: &Metrics,
    topic: &str,
    payload: &[u8],
) -> Option<(caas_protocol::Vin, Msg)> {
    match topics::parse_topic(topic) {
        Some((vin, TopicKind::Report)) => {
            if payload.len() > MAX_REPORT_FRAME_SIZE {
                metrics
                    .reports_forged
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return None;
            }
            Some((
                vin,
                Msg::Report {
                    vin,
                    payload: payload.to_vec(),
                },
            ))
        }
        Some((vin, TopicKind::Presence)) => {
            let online = payload == topics::PRESENCE_ONLINE;
            (online || payload == topics::PRESENCE_OFFLINE)
                .then_some((vin, Msg::Presence { vin, online }))
        }
        _ => None,
    }
}

/// One embedded rumqttd router's door: our fronts hand it each accepted connection.
pub(crate) type Acceptor = rumqttd::ConnectionAcceptor<rumqttd::protocol::v4::V4>;

/// What rumqttd keeps of each car's own filters (its command topic): one segment of at most
/// [`CAR_FILTER_SEGMENT`] bytes past the newest message. A command carries the car's whole
/// desired state, so only the newest one matters (a car reconnecting after more than that
/// resumes at the oldest kept, and the newest is also retained); a bigger log only grew the
/// process by every command of every car, up to 16 MiB per car, as campaigns went by.
const CAR_FILTER_SEGMENT: usize = 1024;

/// What rumqttd keeps of each of the [`topics::BENCH_TOPICS`] (the bench's bare round trips,
/// `caas-sim bench`), per router: one segment of 1 MiB, ~5,000 of its 208-byte messages, so
/// a subscriber that falls behind in a stall gets them late rather than not at all.
const BENCH_FILTER_SEGMENT: rumqttd::SegmentConfig = rumqttd::SegmentConfig {
    max_segment_size: 1024 * 1024,
    max_segment_count: 1,
};

/// What rumqttd keeps of each of the gateway's fleet-wide filters (all reports, all
/// presence), per router: 4 segments of 4 MiB, ~12,000 reports of slack for the gateway's
/// link to fall behind during a campaign's burst before the oldest would be dropped.
const FLEET_FILTER_SEGMENT: rumqttd::SegmentConfig = rumqttd::SegmentConfig {
    max_segment_size: 4 * 1024 * 1024,
    max_segment_count: 4,
};

fn router_config() -> rumqttd::RouterConfig {
    let fleet_filters = [topics::ALL_REPORTS, topics::ALL_PRESENCE]
        .into_iter()
        .map(|f| (f.to_owned(), FLEET_FILTER_SEGMENT))
        .chain(
            topics::BENCH_TOPICS
                .into_iter()
                .map(|f| (f.to_owned(), BENCH_FILTER_SEGMENT)),
        )
        .collect();
    rumqttd::RouterConfig {
        max_connections: 1 << 20,
        max_outgoing_packet_count: 1024,
        max_segment_size: CAR_FILTER_SEGMENT,
        max_segment_count: 1,
        custom_segment: Some(fleet_filters),
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    }
}

/// Which of `k` broker routers serves `vin`: the engine's own split of cars over shards
/// (FNV-1a), so with as many routers as shards a router's cars are one shard's
/// ([`Embedded::attach`]). It routes the car's connection and the gateway's commands to it.
pub(crate) fn broker_shard(vin: &caas_protocol::Vin, k: usize) -> usize {
    crate::engine::shard_of(vin, k.max(1))
}

/// The MQTT side chosen by the configuration, before the engine starts.
pub(crate) enum Broker {
    /// An external broker's client, not yet polled ([`start_external`]); boxed, as rumqttc's
    /// event loop is ~1 KB.
    External(Box<External>),
    /// The embedded routers, already running.
    Embedded(Embedded),
}

/// Prepares the MQTT side `cfg` asks for (an external broker's client, or the embedded
/// routers started) and the [`Publisher`] the engine's flushers hand commands to.
pub(crate) fn prepare(cfg: &Config, metrics: &Metrics) -> anyhow::Result<(Broker, Publisher)> {
    Ok(match &cfg.broker {
        Some(url) => {
            // Disconnected until the first CONNACK: what the engine publishes before it is
            // deferred, and that CONNACK's re-send covers it.
            metrics.broker_disconnected.store(1, Relaxed);
            let (external, client) = External::new(cfg, url)?;
            (
                Broker::External(Box::new(external)),
                Publisher::Client(client),
            )
        }
        None => {
            let (embedded, publisher) = start_embedded(cfg.broker_shards)?;
            (Broker::Embedded(embedded), publisher)
        }
    })
}

/// The embedded broker's `k` rumqttd routers, started before the engine so that the engine's
/// flushers publish straight into them ([`Publisher::Links`]); [`Embedded::attach`] then
/// connects the engine to what they receive and gives the acceptors to the fronts.
pub(crate) struct Embedded {
    /// Per router (index = [`broker_shard`]): the gateway's link, subscribed to every car's
    /// reports and presence, not yet attached to the engine.
    reports: Vec<rumqttd::local::LinkRx>,
    acceptors: Vec<Acceptor>,
}

/// Starts `k` rumqttd routers, each with the gateway's in-process link (subscribed to every
/// car's reports and presence); returns them and the [`Publisher`] into them. Cars reach them
/// through our fronts ([`crate::tlsfront`]), which pick the router by VIN and hand the
/// connection over in-process: one file descriptor per car, no loopback hop.
///
/// rumqttd is vendored with a patch (`vendor/rumqttd/PATCHES.md`) so that a new topic is
/// matched against the wildcard filters only and an exact filter is looked up, instead of
/// every topic against every filter (quadratic over a fleet; `benches/router_matching.rs`).
/// Several routers still spread the routing work over threads.
fn start_embedded(k: usize) -> anyhow::Result<(Embedded, Publisher)> {
    let k = k.max(1);
    let mut publish = Vec::with_capacity(k);
    let mut reports = Vec::with_capacity(k);
    let mut acceptors = Vec::with_capacity(k);
    for i in 0..k {
        let router = rumqttd::Router::new(i, router_config());
        let router_tx = router.spawn();
        let (mut link_tx, link_rx, _ack) =
            rumqttd::local::LinkBuilder::new("caas-gateway", router_tx.clone())
                .build()
                .map_err(|e| anyhow!("gateway link: {e}"))?;
        link_tx
            .subscribe(topics::ALL_REPORTS)
            .map_err(|e| anyhow!("subscribe: {e}"))?;
        link_tx
            .subscribe(topics::ALL_PRESENCE)
            .map_err(|e| anyhow!("subscribe: {e}"))?;
        publish.push(std::sync::Mutex::new(link_tx));
        reports.push(link_rx);
        acceptors.push(Acceptor::new(
            connection_settings(),
            router_tx,
            rumqttd::protocol::v4::V4,
        ));
    }
    Ok((Embedded { reports, acceptors }, Publisher::Links(publish)))
}

impl Embedded {
    /// Connects the engine to every router's reports and presence, and returns each router's
    /// [`Acceptor`] (index = [`broker_shard`]).
    ///
    /// With as many engine shards as routers (the default: half the cores each), a router's
    /// cars are exactly one shard's ([`broker_shard`] is the engine's own split), so each shard
    /// reads its router's link itself ([`Msg::BrokerLink`]): a report wakes one thread, the
    /// shard, instead of an async task that wakes the shard. Otherwise a task per router
    /// hands each message to its car's shard.
    pub(crate) fn attach(self, engine: &Engine, metrics: &Arc<Metrics>) -> Vec<Acceptor> {
        let direct = engine.shard_count() == self.reports.len();
        for (i, link_rx) in self.reports.into_iter().enumerate() {
            if direct {
                let _ = engine.shard_at(i).send(Msg::BrokerLink(Box::new(link_rx)));
            } else {
                tokio::spawn(hand_reports_on(link_rx, engine.clone(), metrics.clone()));
            }
        }
        self.acceptors
    }
}

/// Hands each report and presence message of a router's link to its car's shard.
async fn hand_reports_on(
    mut link_rx: rumqttd::local::LinkRx,
    engine: Engine,
    metrics: Arc<Metrics>,
) {
    loop {
        match link_rx.next().await {
            Ok(Some(rumqttd::Notification::Forward(f))) => {
                if let Some((vin, msg)) = route_forward(&metrics, &f) {
                    let _ = engine.shard(&vin).send_async(msg).await;
                }
            }
            Ok(Some(rumqttd::Notification::Unschedule)) => {
                if link_rx.wake().await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "embedded broker link closed");
                return;
            }
        }
    }
}

/// [`route`] for a message the embedded broker forwards.
pub(crate) fn route_forward(
    metrics: &Metrics,
    f: &rumqttd::Forward,
) -> Option<(caas_protocol::Vin, Msg)> {
    let topic = std::str::from_utf8(&f.publish.topic).ok()?;
    route(metrics, topic, &f.publish.payload)
}

/// Where the engine's flushers hand the commands of each flushed batch.
pub(crate) enum Publisher {
    /// An external broker's client: the flusher's thread queues each command on the client's
    /// event loop itself ([`OUT_QUEUE`]), with no task between them to wake.
    Client(rumqttc::Client),
    /// The embedded routers' gateway links (index = [`broker_shard`]): the flusher's thread
    /// queues a batch's commands on each router's link itself, with one router event per
    /// router and batch, instead of waking a task that sends them one by one.
    Links(Vec<std::sync::Mutex<rumqttd::local::LinkTx>>),
}

impl Publisher {
    /// Publishes `batch` (each car's commands in order), counting what it hands over
    /// (`caas_commands_published_total`). Waits while the client's request queue, or a
    /// router's event queue, is full.
    ///
    /// While the external broker is disconnected the batch is dropped and counted
    /// (`caas_commands_deferred_total`) instead: nothing queued would leave before the
    /// reconnection, which re-sends every car's state not yet confirmed anyway
    /// ([`Msg::RepublishAll`]; a deferred command is always such a state), and a flusher
    /// waiting for room in the queue would hold up its shard, and every answer behind it,
    /// until the broker came back.
    pub(crate) fn publish(&self, batch: Vec<Outbound>, metrics: &Metrics) {
        match self {
            Publisher::Client(client) => {
                let mut batch = batch.into_iter();
                while let Some(o) = batch.next() {
                    // Looked at for each command, not once a batch: a connection lost while
                    // this flusher waited for room has the queue emptied (rumqttc moves it
                    // aside), and the rest of the batch must not fill it again and wait. (The
                    // flag is set just after that; only a queue smaller than a batch, far
                    // below the default, could fill in between.)
                    if metrics.broker_disconnected.load(Relaxed) != 0 {
                        let rest = 1 + batch.len() as u64;
                        metrics.commands_deferred.fetch_add(rest, Relaxed);
                        return;
                    }
                    // An error means the event loop is gone (our topics are all valid).
                    if client
                        .publish(o.topic, rumqttc::QoS::AtLeastOnce, o.retain, o.payload)
                        .is_err()
                    {
                        return;
                    }
                    metrics.commands_published.fetch_add(1, Relaxed);
                }
            }
            Publisher::Links(links) => {
                let mut per_router: Vec<Vec<Packet>> = links.iter().map(|_| Vec::new()).collect();
                for o in batch {
                    let Some((vin, _)) = topics::parse_topic(&o.topic) else {
                        continue;
                    };
                    // Local links publish at QoS 0; rumqttd forwards at the subscriber's QoS,
                    // so cars subscribed at QoS 1 still get at-least-once delivery.
                    let publish = Publish::new(
                        bytes::Bytes::from(o.topic.into_bytes()),
                        bytes::Bytes::from(o.payload),
                        o.retain,
                    );
                    per_router[broker_shard(&vin, links.len())]
                        .push(Packet::Publish(publish, None));
                }
                for (link, packets) in links.iter().zip(per_router) {
                    if packets.is_empty() {
                        continue;
                    }
                    let mut link = match link.lock() {
                        Ok(l) => l,
                        Err(poisoned) => poisoned.into_inner(),
                    };
                    let sent = packets.len() as u64;
                    if link.push_all(packets).is_err() {
                        tracing::error!("embedded broker gone; commands are not published");
                        return;
                    }
                    metrics.commands_published.fetch_add(sent, Relaxed);
                }
            }
        }
    }
}

fn connection_settings() -> rumqttd::ConnectionSettings {
    rumqttd::ConnectionSettings {
        connection_timeout_ms: CONNECT_TIMEOUT_MS,
        max_payload_size: MAX_PAYLOAD,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: false,
    }
}

/// Loads a rustls client configuration (for an `mqtts://` external broker).
pub(crate) fn client_tls(cfg: &Config) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let tls = cfg
        .tls
        .as_ref()
        .ok_or_else(|| anyhow!("mqtts:// needs --tls-ca/--tls-cert/--tls-key"))?;
    client_tls_of(tls)
}

fn client_tls_of(tls: &crate::config::TlsFiles) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let roots = crate::tlsfront::roots_of(&crate::tlsfront::read_certs(&tls.ca)?)?;
    let certs = crate::tlsfront::read_certs(&tls.cert)?;
    let key = crate::tlsfront::read_key(&tls.key)?;
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .context("client certificate")?;
    Ok(Arc::new(config))
}

/// An external broker's client before it first connects: rumqttc's event loop, whose request
/// queue the [`Publisher::Client`] feeds.
pub(crate) struct External {
    event_loop: rumqttc::EventLoop,
    /// The files an `mqtts://` connection's TLS came from, and how they were when read: a
    /// renewed client certificate is taken at the next reconnection (it is only shown in a
    /// handshake).
    tls_files: Option<(crate::config::TlsFiles, [crate::tlsfront::FileStamp; 3])>,
}

impl External {
    /// The client for the broker at `url` (`mqtt://` or `mqtts://host:port`), and the
    /// blocking handle the flushers publish with.
    fn new(cfg: &Config, url: &str) -> anyhow::Result<(External, rumqttc::Client)> {
        use rumqttc::{MqttOptions, Transport};
        let (scheme, hostport) = split_broker_url(url)?;
        let (host, port) = hostport
            .rsplit_once(':')
            .ok_or_else(|| anyhow!("broker URL needs host:port"))?;
        let port: u16 = port
            .parse()
            .with_context(|| format!("broker port in {url:?}"))?;
        let client_id = format!("caas-gateway-{:08x}", rand::random::<u32>());
        let mut opts =
            MqttOptions::new(client_id, host.trim_matches(|c| c == '[' || c == ']'), port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_clean_session(true);
        opts.set_max_packet_size(MAX_PAYLOAD * 4, MAX_PAYLOAD * 4);
        opts.set_inflight(1000);
        let mut tls_files = None;
        if scheme == "mqtts" {
            opts.set_transport(Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(client_tls(cfg)?),
            ));
            tls_files = cfg.tls.clone().map(|t| {
                let stamps = crate::tlsfront::tls_file_stamps(&t);
                (t, stamps)
            });
        }
        // rumqttc's blocking `Client` (a flusher publishes from its own thread, and waits while
        // the request queue is full) comes only with a `Connection`: the event loop inside a
        // runtime of its own. We poll the event loop on the gateway's runtime instead. The
        // unused runtime is made and dropped on a thread of its own, because dropping a
        // runtime inside another runtime's async context panics.
        let queue = cfg.broker_queue;
        let (client, mut event_loop) = std::thread::spawn(move || {
            let (client, connection) = rumqttc::Client::new(opts, queue);
            let rumqttc::Connection { eventloop, .. } = connection;
            (client, eventloop)
        })
        .join()
        .map_err(|_| anyhow!("the external broker's client could not be made"))?;
        let mut net = event_loop.network_options();
        net.set_tcp_nodelay(true);
        event_loop.set_network_options(net);
        Ok((
            External {
                event_loop,
                tls_files,
            },
            client,
        ))
    }
}

/// Drives the external broker's client; returns its task. Reports and presence go straight
/// to their car's shard ([`hand_on`]); each (re)connection subscribes to them again and asks
/// the engine to re-send every state not yet confirmed.
pub(crate) fn start_external(
    external: Box<External>,
    engine: Engine,
    metrics: Arc<Metrics>,
) -> tokio::task::JoinHandle<()> {
    use rumqttc::{Event, Packet as CPacket, QoS as CQoS, Request, Subscribe, SubscribeFilter};
    let External {
        event_loop: mut el,
        mut tls_files,
    } = *external;
    // A connection asks for every car's state again on a channel of its own, never shed as
    // reports are: one waiting request stands for any number (the newest state is re-sent).
    let (republish, republish_rx) = flume::bounded::<()>(1);
    let dispatcher = engine.clone();
    tokio::spawn(async move {
        while republish_rx.recv_async().await.is_ok() {
            let delivered = dispatcher
                .broadcast_async(|| Msg::RepublishAll { only_behind: true })
                .await;
            if !delivered {
                return;
            }
        }
    });
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(CPacket::ConnAck(_))) => {
                    metrics
                        .broker_connected_at_ms
                        .store(crate::store::now_ms(), Relaxed);
                    metrics.broker_disconnected.store(0, Relaxed);
                    tracing::info!("connected to the external broker");
                    // Ahead of any command still queued, and never refused: through the
                    // request queue it would wait behind them, and be dropped were the queue
                    // full (the gateway would then hear no car until it restarts).
                    //
                    // At QoS 0: the session is clean, so QoS 1 would not keep a report across
                    // a reconnection anyway; what it adds is the broker's in-flight window for
                    // this one client, which carries the whole fleet's reports. Mosquitto
                    // holds at most `max_inflight_messages` unacknowledged and queues at most
                    // `max_queued_messages` more, then drops: with the shipped bounds (100
                    // and 1,000) a 19,000-car campaign lost reports and took 61 s (each lost
                    // one waited for its attempt timeout) instead of ~2.4 s. At QoS 0 the
                    // broker writes each report out as it comes, and no acknowledgement goes
                    // back for it.
                    el.pending
                        .push_front(Request::Subscribe(Subscribe::new_many([
                            SubscribeFilter::new(topics::ALL_REPORTS.to_string(), CQoS::AtMostOnce),
                            SubscribeFilter::new(
                                topics::ALL_PRESENCE.to_string(),
                                CQoS::AtMostOnce,
                            ),
                        ])));
                    // The broker may have lost retained commands (restart without persistence):
                    // the cars that have not confirmed their newest get it again.
                    let _ = republish.try_send(());
                }
                Ok(Event::Incoming(CPacket::Publish(p))) => {
                    if let Some((vin, msg)) = route(&metrics, &p.topic, &p.payload) {
                        hand_on(engine.shard(&vin), &metrics, msg);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    metrics.broker_disconnected.store(1, Relaxed);
                    tracing::warn!(error = %e, "external broker connection; retrying in 1 s");
                    if let Some(tls) = tls_files
                        .as_mut()
                        .and_then(|(files, seen)| renewed_client_tls(files, seen, &metrics))
                    {
                        el.mqtt_options
                            .set_transport(rumqttc::Transport::tls_with_config(
                                rumqttc::TlsConfiguration::Rustls(tls),
                            ));
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    })
}

/// The client TLS configuration of `files` if they changed since `seen` (which then becomes
/// their stamps) and load; `None` when unchanged or when they do not load (counted: the one
/// in force stays).
fn renewed_client_tls(
    files: &crate::config::TlsFiles,
    seen: &mut [crate::tlsfront::FileStamp; 3],
    metrics: &Metrics,
) -> Option<Arc<rustls::ClientConfig>> {
    let now = crate::tlsfront::tls_file_stamps(files);
    if now == *seen {
        return None;
    }
    *seen = now;
    match client_tls_of(files) {
        Ok(tls) => {
            metrics.broker_tls_reloads.fetch_add(1, Relaxed);
            tracing::info!(cert = %files.cert.display(), "external broker client certificate loaded");
            Some(tls)
        }
        Err(e) => {
            metrics.broker_tls_reload_failures.fetch_add(1, Relaxed);
            tracing::error!(error = %format!("{e:#}"),
                "external broker client certificate not loaded; the one in force stays");
            None
        }
    }
}

/// Queues a report or presence message from the external broker on its car's shard without
/// waiting. rumqttc's one event loop both receives them and writes our commands, so it must
/// never wait for a shard: a shard waits for its flusher, which waits while [`OUT_QUEUE`] is
/// full, which only the event loop drains (a cycle). When the shard's queue
/// ([`crate::engine::SHARD_QUEUE`]) is full the message is shed and counted
/// (`caas_inbound_shed_total`): a shed report costs its request one attempt timeout (the car
/// reports again on the resend), a shed presence message only stale connectivity until the
/// car's next one. Straight into the shard's queue, with no task between (one thread
/// wake-up less per report).
fn hand_on(queue: &flume::Sender<Msg>, metrics: &Metrics, next: Msg) {
    if let Err(flume::TrySendError::Full(_)) = queue.try_send(next) {
        let shed = metrics
            .inbound_shed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if shed.is_power_of_two() {
            tracing::warn!(
                shed = shed + 1,
                "the engine is behind the external broker; shedding its messages"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The segment sizes rumqttd gives a filter, found the way it finds them (`Data::new`).
    fn segment_of(config: &rumqttd::RouterConfig, filter: &str) -> (usize, usize) {
        config
            .custom_segment
            .iter()
            .flatten()
            .filter(|(f, _)| rumqttd::protocol::matches(filter, f))
            .map(|(_, s)| (s.max_segment_size, s.max_segment_count))
            .last()
            .unwrap_or((config.max_segment_size, config.max_segment_count))
    }

    #[test]
    fn a_full_inbound_queue_sheds_and_counts_instead_of_waiting() {
        let metrics = Metrics::default();
        let (queue, rx) = flume::bounded(1);
        // On this thread a wait for room would never end: only the receiver could make it.
        let vin: caas_protocol::Vin = "WVWZZZ1JZXW000001".parse().unwrap();
        let presence = || Msg::Presence { vin, online: true };
        hand_on(&queue, &metrics, presence());
        hand_on(&queue, &metrics, presence());
        hand_on(&queue, &metrics, presence());
        assert_eq!(
            metrics
                .inbound_shed
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
        assert!(matches!(rx.try_recv(), Ok(Msg::Presence { .. })));
        assert!(rx.try_recv().is_err(), "the shed ones are not queued");
        assert!(metrics.render().contains("caas_inbound_shed_total 2"));
    }

    #[test]
    fn fleet_filters_keep_a_burst_and_a_car_filter_keeps_only_its_newest_commands() {
        let config = router_config();
        let fleet = (
            FLEET_FILTER_SEGMENT.max_segment_size,
            FLEET_FILTER_SEGMENT.max_segment_count,
        );
        assert_eq!(segment_of(&config, topics::ALL_REPORTS), fleet);
        assert_eq!(segment_of(&config, topics::ALL_PRESENCE), fleet);
        let vin: Result<caas_protocol::Vin, _> = "WVWZZZ1JZXW000001".parse();
        let car_filter = vin.map(|v| topics::command_topic(&v).to_string());
        assert_eq!(
            car_filter.map(|f| segment_of(&config, &f)),
            Ok((CAR_FILTER_SEGMENT, 1))
        );
        for bench in topics::BENCH_TOPICS {
            assert_eq!(
                segment_of(&config, bench),
                (BENCH_FILTER_SEGMENT.max_segment_size, 1)
            );
        }
        // Only those two: other topics beside them keep a car filter's log.
        assert_eq!(
            segment_of(&config, "caas-bench/other"),
            (CAR_FILTER_SEGMENT, 1)
        );
    }
}
