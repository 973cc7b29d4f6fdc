//! MQTT fan-out: the embedded rumqttd broker (default) or an external broker (rumqttc).
//!
//! Either way the engine hands signed commands to one bounded queue ([`OUT_QUEUE`]) and
//! receives every car's reports and presence through [`dispatch`].
//!
//! Embedded: we build rumqttd's router ourselves (so we own its sender), attach the
//! gateway as an in-process link without a tenant that subscribes `/tenants/+/report` and
//! `/tenants/+/presence`, and run rumqttd's plain v4 listener. Cars with certificates use
//! our own TLS front ([`crate::tlsfront`]), which rumqttd's TLS listener cannot replace:
//! it runs each handshake inline in its accept loop, so one idle socket stalls everyone.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use caas_protocol::topics::{self, TopicKind};
use caas_protocol::MAX_REPORT_FRAME_SIZE;
use rumqttd::protocol::{Packet, Publish};

use crate::config::{split_broker_url, Config};
use crate::engine::{Engine, Msg, Outbound};
use crate::metrics::Metrics;

/// Commands waiting to be published; the committer waits when it is full.
pub(crate) const OUT_QUEUE: usize = 65_536;
/// Largest MQTT payload the embedded broker accepts (a report is far smaller).
const MAX_PAYLOAD: usize = 16 * 1024;
/// How long a connection may take to send CONNECT.
const CONNECT_TIMEOUT_MS: u16 = 10_000;

/// Routes one received message to the car's shard.
pub(crate) fn dispatch(engine: &Engine, metrics: &Metrics, topic: &str, payload: &[u8]) {
    match topics::parse_topic(topic) {
        Some((vin, TopicKind::Report)) => {
            if payload.len() > MAX_REPORT_FRAME_SIZE {
                metrics.reports_forged.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return;
            }
            let _ = engine.shard(&vin).send(Msg::Report { vin, payload: payload.to_vec() });
        }
        Some((vin, TopicKind::Presence)) => {
            let online = payload == topics::PRESENCE_ONLINE;
            if online || payload == topics::PRESENCE_OFFLINE {
                let _ = engine.shard(&vin).send(Msg::Presence { vin, online });
            }
        }
        _ => {}
    }
}

/// Binds `addr` if its port is 0 to learn a free port (rumqttd binds by address itself).
pub(crate) fn resolve_port(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    let l = std::net::TcpListener::bind(addr)?;
    l.local_addr()
}

fn router_config() -> rumqttd::RouterConfig {
    rumqttd::RouterConfig {
        max_connections: 1 << 20,
        max_outgoing_packet_count: 1024,
        // Per subscription filter: at most 4 segments of 4 MiB held in memory.
        max_segment_size: 4 * 1024 * 1024,
        max_segment_count: 4,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    }
}

/// Starts rumqttd's router, the gateway's in-process link and a plain v4 listener for each
/// `(name, address)`; returns the listeners' addresses (port 0 resolved).
pub(crate) fn start_embedded(
    engine: Engine,
    metrics: Arc<Metrics>,
    out: flume::Receiver<Outbound>,
    listeners: &[(&str, SocketAddr)],
) -> anyhow::Result<Vec<SocketAddr>> {
    let router = rumqttd::Router::new(0, router_config());
    let router_tx = router.spawn();
    let (mut link_tx, mut link_rx, _ack) = rumqttd::local::LinkBuilder::new("caas-gateway", router_tx.clone())
        .build()
        .map_err(|e| anyhow!("gateway link: {e}"))?;
    link_tx.subscribe(topics::ALL_REPORTS).map_err(|e| anyhow!("subscribe: {e}"))?;
    link_tx.subscribe(topics::ALL_PRESENCE).map_err(|e| anyhow!("subscribe: {e}"))?;

    std::thread::Builder::new().name("gw-mqtt-in".into()).spawn(move || loop {
        match link_rx.recv() {
            Ok(Some(rumqttd::Notification::Forward(f))) => {
                if let Ok(topic) = std::str::from_utf8(&f.publish.topic) {
                    dispatch(&engine, &metrics, topic, &f.publish.payload);
                }
            }
            Ok(Some(rumqttd::Notification::Unschedule)) => {
                if link_rx.ready().is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "embedded broker link closed");
                return;
            }
        }
    })?;

    std::thread::Builder::new().name("gw-mqtt-out".into()).spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        rt.block_on(async move {
            while let Ok(o) = out.recv_async().await {
                // Local links publish at QoS 0; rumqttd forwards at the subscriber's QoS, so
                // cars subscribed at QoS 1 still get at-least-once delivery.
                let publish = Publish::new(bytes::Bytes::from(o.topic.into_bytes()), o.payload.into(), o.retain);
                if link_tx.send(Packet::Publish(publish, None)).await.is_err() {
                    tracing::error!("embedded broker gone; publisher stops");
                    return;
                }
            }
        });
    })?;
    let mut addrs = Vec::new();
    for (name, listen) in listeners {
        let listen = resolve_port(*listen).with_context(|| format!("MQTT listener {listen}"))?;
        // Fail early with a clear message if the address is taken (rumqttd would only log it).
        drop(std::net::TcpListener::bind(listen).with_context(|| format!("MQTT listener {listen}"))?);
        let mut server =
            rumqttd::Server::new(server_settings(name, listen), router_tx.clone(), rumqttd::protocol::v4::V4);
        std::thread::Builder::new().name(format!("gw-{name}")).spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async move {
                if let Err(e) = server.start(rumqttd::LinkType::Remote).await {
                    tracing::error!(error = %e, "MQTT listener stopped");
                }
            });
        })?;
        addrs.push(listen);
    }
    Ok(addrs)
}

fn server_settings(name: &str, listen: SocketAddr) -> rumqttd::ServerSettings {
    rumqttd::ServerSettings {
        name: name.to_owned(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: CONNECT_TIMEOUT_MS,
            max_payload_size: MAX_PAYLOAD,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: false,
        },
    }
}

/// Loads a rustls client configuration (for an `mqtts://` external broker).
pub(crate) fn client_tls(cfg: &Config) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let tls = cfg.tls.as_ref().ok_or_else(|| anyhow!("mqtts:// needs --tls-ca/--tls-cert/--tls-key"))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in crate::tlsfront::read_certs(&tls.ca)? {
        roots.add(c).context("CA certificate")?;
    }
    let certs = crate::tlsfront::read_certs(&tls.cert)?;
    let key = crate::tlsfront::read_key(&tls.key)?;
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .context("client certificate")?;
    Ok(Arc::new(config))
}

/// Connects to an external broker; returns the task driving it.
pub(crate) fn start_external(
    cfg: &Config,
    url: &str,
    engine: Engine,
    metrics: Arc<Metrics>,
    out: flume::Receiver<Outbound>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet as CPacket, QoS as CQoS, Transport};
    let (scheme, hostport) = split_broker_url(url)?;
    let (host, port) = hostport.rsplit_once(':').ok_or_else(|| anyhow!("broker URL needs host:port"))?;
    let port: u16 = port.parse().with_context(|| format!("broker port in {url:?}"))?;
    let client_id = format!("caas-gateway-{:08x}", rand::random::<u32>());
    let mut opts = MqttOptions::new(client_id, host.trim_matches(|c| c == '[' || c == ']'), port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(true);
    opts.set_max_packet_size(MAX_PAYLOAD * 4, MAX_PAYLOAD * 4);
    opts.set_inflight(1000);
    if scheme == "mqtts" {
        opts.set_transport(Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(client_tls(cfg)?)));
    }
    let (client, mut el) = AsyncClient::new(opts, 4096);
    let mut net = el.network_options();
    net.set_tcp_nodelay(true);
    el.set_network_options(net);
    let publisher = client.clone();
    tokio::spawn(async move {
        while let Ok(o) = out.recv_async().await {
            if publisher.publish(o.topic, CQoS::AtLeastOnce, o.retain, o.payload).await.is_err() {
                return;
            }
        }
    });
    Ok(tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(CPacket::ConnAck(_))) => {
                    tracing::info!("connected to the external broker");
                    let _ = client.try_subscribe(topics::ALL_REPORTS, CQoS::AtLeastOnce);
                    let _ = client.try_subscribe(topics::ALL_PRESENCE, CQoS::AtLeastOnce);
                    // The broker may have lost retained commands (restart without persistence).
                    engine.broadcast(|| Msg::RepublishAll);
                }
                Ok(Event::Incoming(CPacket::Publish(p))) => {
                    dispatch(&engine, &metrics, &p.topic, &p.payload);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "external broker connection; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }))
}
