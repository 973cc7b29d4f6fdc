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
//!
//! Revocation (`--tls-crl FILE`): a car whose telematics unit was replaced, stolen or
//! compromised keeps a certificate that is valid until it expires. With it, the old unit could
//! still connect as that VIN: its reports are refused (they are not signed with the car's
//! key), but it could read the car's commands and, by connecting again and again, keep
//! knocking the real car's session off. The CA's revocation list (PEM, `caasctl certs
//! revoke`) closes that: a revoked certificate fails the handshake, and the file is read
//! again when it changes (checked every [`CRL_POLL`]), which also closes the live
//! connections of the certificates it newly revokes. A list that fails to load (not PEM, not
//! signed by a trusted CA, too large) leaves the one in force in force.

use std::collections::HashSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context};
use caas_protocol::Vin;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsFiles;
use crate::metrics::Metrics;
use crate::mqtt::Acceptor;

/// Longest a client may take to finish its TLS handshake.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest MQTT packet a car may send through the front (a report is well under 1 KiB).
pub(crate) const MAX_PACKET: usize = 64 * 1024;
/// Most connections in the TLS handshake or being proxied at once.
pub(crate) const MAX_CONNECTIONS: usize = 200_000;
/// How often the revocation list file is checked for a change.
pub(crate) const CRL_POLL: Duration = Duration::from_secs(2);
/// Largest revocation list file read: an entry takes about 40 bytes, so this holds some
/// 400,000 revoked certificates.
pub(crate) const MAX_CRL_FILE: u64 = 16 * 1024 * 1024;

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

/// The certificates `cas` as the roots a peer's certificate must chain to.
pub(crate) fn roots_of(cas: &[CertificateDer<'static>]) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for c in cas {
        roots.add(c.clone()).context("CA certificate")?;
    }
    Ok(roots)
}

/// A file's modification time and length: a change of either means the file changed.
pub(crate) type FileStamp = Option<(SystemTime, u64)>;

/// The stamps of the CA, certificate and key files of `tls`.
pub(crate) fn tls_file_stamps(tls: &TlsFiles) -> [FileStamp; 3] {
    [
        file_stamp(&tls.ca),
        file_stamp(&tls.cert),
        file_stamp(&tls.key),
    ]
}

/// A certificate as a revocation list names it: its issuer's DER name and its serial.
type CertId = (Vec<u8>, Vec<u8>);

/// What the mTLS front checks cars with: replaced whole when the revocation list changes.
pub(crate) struct FrontTls {
    config: Arc<rustls::ServerConfig>,
    /// What the list in force revokes, to close the live connections it names.
    revoked: HashSet<CertId>,
}

impl FrontTls {
    /// Our certificate; client certificates required from the CA and, with `crl`, checked
    /// against that revocation list.
    pub(crate) fn load(tls: &TlsFiles, crl: Option<&Path>) -> anyhow::Result<FrontTls> {
        let cas = read_certs(&tls.ca)?;
        let roots = roots_of(&cas)?;
        let (crls, revoked) = match crl {
            Some(path) => read_crls(path, &cas)?,
            None => (Vec::new(), HashSet::new()),
        };
        // A list revokes what it names; a CA with no list of its own revokes nothing (else a
        // second CA in the bundle would lock its whole fleet out).
        let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
            .with_crls(crls)
            .allow_unknown_revocation_status()
            .build()
            .map_err(|e| anyhow!("client verifier: {e}"))?;
        let config = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(read_certs(&tls.cert)?, read_key(&tls.key)?)
            .context("server certificate")?;
        Ok(FrontTls {
            config: Arc::new(config),
            revoked,
        })
    }

    /// How many certificates the list in force revokes.
    pub(crate) fn revoked_count(&self) -> usize {
        self.revoked.len()
    }
}

/// Reads every revocation list of a PEM file; each must be signed by one of `cas`.
fn read_crls(
    path: &Path,
    cas: &[CertificateDer<'static>],
) -> anyhow::Result<(Vec<CertificateRevocationListDer<'static>>, HashSet<CertId>)> {
    use std::io::Read;
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut pem = Vec::new();
    f.take(MAX_CRL_FILE + 1)
        .read_to_end(&mut pem)
        .with_context(|| format!("reading {}", path.display()))?;
    if pem.len() as u64 > MAX_CRL_FILE {
        bail!("{} is larger than {MAX_CRL_FILE} bytes", path.display());
    }
    let crls: Vec<CertificateRevocationListDer<'static>> =
        rustls_pemfile::crls(&mut pem.as_slice())
            .collect::<Result<_, _>>()
            .with_context(|| format!("reading revocation lists from {}", path.display()))?;
    // An empty file is more likely a list caught half-written than one revoking nothing
    // (`caasctl certs init` writes a list with no entries).
    if crls.is_empty() {
        bail!("no revocation list (X509 CRL) in {}", path.display());
    }
    let mut revoked = HashSet::new();
    for der in &crls {
        let (_, crl) = x509_parser::parse_x509_crl(der.as_ref())
            .map_err(|e| anyhow!("{}: a revocation list does not parse: {e}", path.display()))?;
        let issuer = crl.issuer().as_raw();
        let signed_by_a_ca = cas.iter().any(|ca| {
            x509_parser::parse_x509_certificate(ca.as_ref()).is_ok_and(|(_, ca)| {
                ca.subject().as_raw() == issuer && crl.verify_signature(ca.public_key()).is_ok()
            })
        });
        if !signed_by_a_ca {
            bail!(
                "{}: a revocation list is not signed by a CA of --tls-ca",
                path.display()
            );
        }
        for r in crl.iter_revoked_certificates() {
            revoked.insert((issuer.to_vec(), r.raw_serial().to_vec()));
        }
    }
    Ok((crls, revoked))
}

/// The file's modification time and length ([`FileStamp`]).
pub(crate) fn file_stamp(path: &Path) -> FileStamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Runs `load` on a blocking thread whenever `stamp` changes (checked every `every`) and
/// hands its result to `loaded`, until aborted: the files a listener reads at start, read
/// again when an operator replaces them.
pub(crate) async fn reload_on_change<S, T, L>(
    every: Duration,
    stamp: impl Fn() -> S,
    load: L,
    mut loaded: impl FnMut(anyhow::Result<T>),
) where
    S: PartialEq,
    T: Send + 'static,
    L: Fn() -> anyhow::Result<T> + Clone + Send + 'static,
{
    let mut seen = stamp();
    loop {
        tokio::time::sleep(every).await;
        let now = stamp();
        if now == seen {
            continue;
        }
        // Taken before the read: a write that ends after it changes the stamp again.
        seen = now;
        let load = load.clone();
        loaded(match tokio::task::spawn_blocking(load).await {
            Ok(r) => r,
            Err(e) => Err(anyhow!("the load stopped: {e}")),
        });
    }
}

/// Loads the revocation list at `crl` again whenever the file changes, until aborted.
pub(crate) async fn watch_crl(
    tls: TlsFiles,
    crl: PathBuf,
    front: Arc<watch::Sender<Arc<FrontTls>>>,
    metrics: Arc<Metrics>,
) {
    let path = crl.clone();
    let load = move || FrontTls::load(&tls, Some(&path));
    reload_on_change(
        CRL_POLL,
        || file_stamp(&crl),
        load,
        |r| match r {
            Ok(next) => {
                metrics
                    .crl_entries
                    .store(next.revoked_count() as u64, Relaxed);
                tracing::info!(path = %crl.display(), revoked = next.revoked_count(),
                "revocation list loaded");
                front.send_replace(Arc::new(next));
            }
            Err(e) => {
                metrics.crl_failures.fetch_add(1, Relaxed);
                tracing::error!(error = %format!("{e:#}"),
                "revocation list not loaded; the one in force stays");
            }
        },
    )
    .await;
}

/// Loads the mTLS front's files again whenever its CA, certificate or key file changes (a
/// renewed server certificate, a CA added to the bundle), until aborted: every handshake
/// after it uses them, and the cars connected keep their connections. Without it a renewal
/// needs a restart, which disconnects the whole fleet at once.
pub(crate) async fn watch_certs(
    tls: TlsFiles,
    crl: Option<PathBuf>,
    front: Arc<watch::Sender<Arc<FrontTls>>>,
    metrics: Arc<Metrics>,
) {
    let files = tls.clone();
    let stamps = move || tls_file_stamps(&files);
    let cert = tls.cert.clone();
    let load = move || FrontTls::load(&tls, crl.as_deref());
    reload_on_change(CRL_POLL, stamps, load, |r| match r {
        Ok(next) => {
            metrics.mqtts_cert_reloads.fetch_add(1, Relaxed);
            let expires_at = crate::preflight::expires_at(&cert).unwrap_or(0);
            metrics.mqtts_cert_expires_at.store(expires_at, Relaxed);
            metrics
                .crl_entries
                .store(next.revoked_count() as u64, Relaxed);
            tracing::info!(cert = %cert.display(), "MQTT TLS certificate loaded");
            front.send_replace(Arc::new(next));
        }
        Err(e) => {
            metrics.mqtts_cert_reload_failures.fetch_add(1, Relaxed);
            tracing::error!(error = %format!("{e:#}"),
                "MQTT TLS certificate not loaded; the one in force stays");
        }
    })
    .await;
}

/// The issuer and serial of a certificate.
fn cert_id(cert: &CertificateDer<'_>) -> Option<CertId> {
    let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some((c.issuer().as_raw().to_vec(), c.raw_serial().to_vec()))
}

/// Whether a handshake failed on a revoked client certificate.
fn is_revoked(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| {
            matches!(
                e,
                rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
            )
        })
}

/// Resolves once a revocation list in force names `id` (never, if none ever does).
async fn until_revoked(mut front: watch::Receiver<Arc<FrontTls>>, id: CertId) {
    loop {
        if front.borrow_and_update().revoked.contains(&id) {
            return;
        }
        if front.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
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
    front: watch::Receiver<Arc<FrontTls>>,
    acceptors: Arc<Vec<Acceptor>>,
    metrics: Arc<Metrics>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut refused: u64 = 0;
    loop {
        let (stream, peer, permit) =
            crate::listener::accept_bounded(&listener, &slots, "TLS front", &mut refused).await;
        let tls_acceptor = TlsAcceptor::from(front.borrow().config.clone());
        let (acceptors, front, metrics) = (acceptors.clone(), front.clone(), metrics.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let tls =
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls_acceptor.accept(stream)).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        if is_revoked(&e) {
                            metrics.revoked_refused.fetch_add(1, Relaxed);
                            tracing::info!(%peer, "revoked client certificate refused");
                        } else {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        }
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
            let cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
            let (Some(vin), Some(id)) = (cert.and_then(vin_of), cert.and_then(cert_id)) else {
                tracing::warn!(%peer, "client certificate has no VIN as its Organization; closed");
                return;
            };
            let revoked = Box::pin(until_revoked(front, id));
            let stream = Revocable {
                inner: tls,
                revoked,
                closed: false,
                vin,
                metrics,
            };
            let acceptor = &acceptors[crate::mqtt::broker_shard(&vin, acceptors.len())];
            acceptor.serve(stream, Some(vin.to_string())).await;
        });
    }
}

/// A car's TLS stream that fails once its certificate is revoked: the broker then ends the
/// session as for any broken connection (its will is published, the router forgets it).
struct Revocable<S> {
    inner: S,
    revoked: Pin<Box<dyn Future<Output = ()> + Send>>,
    closed: bool,
    vin: Vin,
    metrics: Arc<Metrics>,
}

impl<S> Revocable<S> {
    /// `Err` once the certificate is revoked (from then on).
    fn check(&mut self, cx: &mut std::task::Context<'_>) -> std::io::Result<()> {
        if !self.closed && self.revoked.as_mut().poll(cx).is_ready() {
            self.closed = true;
            self.metrics.revoked_closed.fetch_add(1, Relaxed);
            tracing::info!(vin = %self.vin, "certificate revoked; connection closed");
        }
        if self.closed {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "client certificate revoked",
            ));
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Revocable<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Revocable<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
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

/// Accepts plain MQTT connections on `listener` and hands each to its VIN's router.
pub(crate) async fn serve_plain(listener: TcpListener, acceptors: Arc<Vec<Acceptor>>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut refused: u64 = 0;
    loop {
        let (mut stream, peer, permit) =
            crate::listener::accept_bounded(&listener, &slots, "MQTT front", &mut refused).await;
        let acceptors = acceptors.clone();
        tokio::spawn(async move {
            let _permit = permit;
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
