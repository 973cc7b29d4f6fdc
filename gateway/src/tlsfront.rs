//! The embedded broker's listeners: our own fronts, plain and mTLS, in front of rumqttd.
//!
//! Why not rumqttd's listeners directly: its TLS listener performs every handshake inline
//! in its accept loop with no timeout, so one TCP socket that connects and says nothing
//! stalls every other car's connection (issue 4, §4); and the gateway runs several rumqttd
//! routers (see [`crate::mqtt::start_embedded`]), so something must pick each car's router.
//! Here each connection gets its own task and [`HANDSHAKE_TIMEOUT`] to finish its TLS
//! handshake (rumqttd then gives it 10 s to send CONNECT), gets TCP_NODELAY, and is handed
//! in-process to its VIN's router ([`crate::mqtt::Acceptor`]): one file descriptor per car.
//!
//! * mTLS: a verified client certificate's Organization must be a VIN. The connection is
//!   handed over with that VIN as its tenant, so rumqttd (feature `validate-tenant-prefix`)
//!   confines it to `/tenants/{VIN}/`: a PUBLISH, SUBSCRIBE or will outside it closes the
//!   connection, and the client id becomes `{VIN}.{client id}` so one car cannot take over
//!   another's session.
//! * Plain (loopback tests, trusted networks): no isolation; the VIN is taken from the
//!   CONNECT's will topic (`/tenants/{VIN}/presence`) or else the client id's first 17
//!   characters; a connection naming no VIN goes to router 0.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use anyhow::{anyhow, Context};
use caas_protocol::Vin;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsFiles;
use crate::mqtt::Acceptor;

/// Longest a client may take to finish its TLS handshake.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest MQTT packet a car may send through the front (a report is well under 1 KiB).
pub(crate) const MAX_PACKET: usize = 64 * 1024;
/// Most connections in the TLS handshake or being proxied at once.
pub(crate) const MAX_CONNECTIONS: usize = 200_000;

/// Reads every certificate of a PEM file.
pub(crate) fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut std::io::BufReader::new(f))
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading certificates from {}", path.display()))?;
    if certs.is_empty() {
        return Err(anyhow!("no certificate in {}", path.display()));
    }
    Ok(certs)
}

/// Reads the first private key of a PEM file.
pub(crate) fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    rustls_pemfile::private_key(&mut std::io::BufReader::new(f))
        .with_context(|| format!("reading key from {}", path.display()))?
        .ok_or_else(|| anyhow!("no private key in {}", path.display()))
}

/// The server configuration: our certificate, client certificates required from the CA.
pub(crate) fn server_config(tls: &TlsFiles) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in read_certs(&tls.ca)? {
        roots.add(c).context("CA certificate")?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .map_err(|e| anyhow!("client verifier: {e}"))?;
    let config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(read_certs(&tls.cert)?, read_key(&tls.key)?)
        .context("server certificate")?;
    Ok(Arc::new(config))
}

/// The VIN in a certificate's subject Organization.
fn vin_of(cert: &CertificateDer<'_>) -> Option<Vin> {
    let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let org = c.subject().iter_organization().next()?.as_str().ok()?;
    org.parse().ok()
}

/// Accepts TLS connections on `listener` and hands each to its VIN's router until aborted.
pub(crate) async fn serve(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    acceptors: Arc<Vec<Acceptor>>,
) {
    let tls_acceptor = TlsAcceptor::from(config);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "TLS front accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "TLS front: connection limit reached; refused");
            continue;
        };
        let tls_acceptor = tls_acceptor.clone();
        let acceptors = acceptors.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = stream.set_nodelay(true);
            let tls =
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls_acceptor.accept(stream)).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
            let vin = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(vin_of);
            let Some(vin) = vin else {
                tracing::warn!(%peer, "client certificate has no VIN as its Organization; closed");
                return;
            };
            let acceptor = &acceptors[crate::mqtt::broker_shard(&vin, acceptors.len())];
            acceptor.serve(tls, Some(vin.to_string())).await;
        });
    }
}

/// Accepts plain MQTT connections on `listener` and hands each to its VIN's router.
pub(crate) async fn serve_plain(listener: TcpListener, acceptors: Arc<Vec<Acceptor>>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (mut stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "MQTT front accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "MQTT front: connection limit reached; refused");
            continue;
        };
        let acceptors = acceptors.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = stream.set_nodelay(true);
            let connect =
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_packet(&mut stream)).await {
                    Ok(Ok(Some(p))) if p[0] >> 4 == 1 => p,
                    _ => {
                        tracing::debug!(%peer, "no CONNECT in time; closed");
                        return;
                    }
                };
            let shard =
                connect_vin(&connect).map_or(0, |v| crate::mqtt::broker_shard(&v, acceptors.len()));
            acceptors[shard]
                .serve(Replay::new(connect, stream), None)
                .await;
        });
    }
}

/// A stream that first replays bytes already read from it (the CONNECT the front looked at).
struct Replay<S> {
    head: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Replay<S> {
    fn new(head: Vec<u8>, inner: S) -> Replay<S> {
        Replay { head, at: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.at < this.head.len() {
            let n = buf.remaining().min(this.head.len() - this.at);
            buf.put_slice(&this.head[this.at..this.at + n]);
            this.at += n;
            if this.at == this.head.len() {
                this.head = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The VIN a CONNECT names: its will topic's, else its client id's first 17 characters.
fn connect_vin(packet: &[u8]) -> Option<Vin> {
    let body = &packet[header_len(packet)..];
    let (_name, at) = read_str(body, 0).ok()?;
    let flags = *body.get(at + 1)?;
    let (client_id, rest_at) = read_str(body, at + 4).ok()?;
    if flags & 0x04 != 0 {
        if let Ok((topic, _)) = read_str(body, rest_at) {
            let vin = std::str::from_utf8(topic)
                .ok()
                .and_then(caas_protocol::topics::parse_topic)
                .map(|(v, _)| v);
            if vin.is_some() {
                return vin;
            }
        }
    }
    client_id
        .get(..caas_protocol::VIN_LEN)
        .and_then(|b| Vin::from_bytes(b).ok())
}

/// Reads one whole MQTT packet (fixed header included); `None` at a clean end of stream.
async fn read_packet<R: AsyncRead + Unpin>(r: &mut R) -> anyhow::Result<Option<Vec<u8>>> {
    let mut b0 = [0u8; 1];
    if r.read(&mut b0).await? == 0 {
        return Ok(None);
    }
    let mut packet = vec![b0[0]];
    let mut len: usize = 0;
    for i in 0..4 {
        let b = r.read_u8().await?;
        packet.push(b);
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            break;
        }
        if i == 3 {
            return Err(anyhow!("malformed remaining length"));
        }
    }
    if len > MAX_PACKET {
        return Err(anyhow!("packet of {len} bytes is over {MAX_PACKET}"));
    }
    let start = packet.len();
    packet.resize(start + len, 0);
    r.read_exact(&mut packet[start..]).await?;
    Ok(Some(packet))
}

fn header_len(packet: &[u8]) -> usize {
    1 + packet[1..]
        .iter()
        .take(4)
        .position(|b| b & 0x80 == 0)
        .map_or(4, |p| p + 1)
}

fn read_str(body: &[u8], at: usize) -> anyhow::Result<(&[u8], usize)> {
    let len = body.get(at..at + 2).ok_or_else(|| anyhow!("truncated"))?;
    let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
    let s = body
        .get(at + 2..at + 2 + len)
        .ok_or_else(|| anyhow!("truncated"))?;
    Ok((s, at + 2 + len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn encode_len(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let mut b = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                b |= 0x80;
            }
            out.push(b);
            if n == 0 {
                break;
            }
        }
    }

    fn vin() -> Vin {
        "WVWZZZ1JZXW000001".parse().unwrap()
    }

    fn connect(client_id: &str, will: Option<&str>) -> Vec<u8> {
        let flags = if will.is_some() { 0x06 } else { 0x02 };
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, flags, 0, 30];
        body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
        body.extend_from_slice(client_id.as_bytes());
        if let Some(t) = will {
            body.extend_from_slice(&(t.len() as u16).to_be_bytes());
            body.extend_from_slice(t.as_bytes());
            body.extend_from_slice(&[0, 7]);
            body.extend_from_slice(b"offline");
        }
        let mut p = vec![0x10];
        encode_len(body.len(), &mut p);
        p.extend_from_slice(&body);
        p
    }

    #[test]
    fn plain_connections_are_routed_by_the_vin_they_name() {
        assert_eq!(
            connect_vin(&connect("x", Some("/tenants/WVWZZZ1JZXW000001/presence"))),
            Some(vin())
        );
        assert_eq!(
            connect_vin(&connect("WVWZZZ1JZXW000001", None)),
            Some(vin())
        );
        assert_eq!(
            connect_vin(&connect("WVWZZZ1JZXW000001-sim", None)),
            Some(vin())
        );
        assert_eq!(connect_vin(&connect("anonymous", None)), None);
    }

    #[tokio::test]
    async fn replay_yields_the_connect_then_the_stream() {
        let (mut near, far) = tokio::io::duplex(64);
        near.write_all(b" rest").await.unwrap();
        drop(near);
        let mut r = Replay::new(b"CONNECT".to_vec(), far);
        let mut all = Vec::new();
        r.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"CONNECT rest");
    }
}
