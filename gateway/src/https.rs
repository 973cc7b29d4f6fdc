//! The IoT API over TLS (`--https ADDR`): the same routes as the plain listener, for a CaaS
//! core that reaches the gateway over a network.
//!
//! Why in the gateway and not only behind a proxy: the API carries the bearer token and
//! its calls charge customers, so in the clear anyone on the path could replay or forge
//! them; and a gateway that is safe to run needs no second program to be so. Optionally
//! (`--https-client-ca FILE`) callers must also present a client certificate from that CA,
//! on top of the token.
//!
//! The handshakes never stall one another, the lesson of rumqttd's TLS listener
//! ([`crate::tlsfront`]): each accepted connection gets its own task and
//! [`HANDSHAKE_TIMEOUT`], and only finished handshakes reach axum, through a bounded queue
//! ([`HANDSHAKEN_QUEUE`]). Connections are bounded as the plain listener's are
//! ([`crate::listener::MAX_HTTP_CONNECTIONS`], each slot held from accept to close) and
//! closed after [`crate::listener::HTTP_IDLE_TIMEOUT`] without a byte.
//!
//! Certificate rotation needs no restart: the certificate, key and client CA files are
//! checked every [`RELOAD_POLL`], and a changed set that loads is used for every handshake
//! after it (connections already open keep theirs). A set that does not load (a key that is
//! not the certificate's, a file half written) leaves the one in force and is counted
//! (`caas_https_cert_reload_failures_total`); at start it stops the gateway instead.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::config::HttpsFiles;
use crate::listener::Counted;
use crate::metrics::Metrics;
use crate::tlsfront::{
    file_stamp, read_certs, read_key, reload_on_change, roots_of, FileStamp, HANDSHAKE_TIMEOUT,
};

/// Connections whose handshake is done and that axum has not yet taken. axum takes each at
/// once, so this only bounds a burst of handshakes finishing together.
pub(crate) const HANDSHAKEN_QUEUE: usize = 1_024;
/// How often the certificate, key and client CA files are checked for a change.
pub(crate) const RELOAD_POLL: Duration = Duration::from_secs(2);

/// The server configuration the files give: our certificate chain and key, and with a client
/// CA, client certificates required from it. HTTP/2 and HTTP/1.1 offered by ALPN, h2 first:
/// the server tells them apart by the connection's first bytes, so either works.
pub(crate) fn load(files: &HttpsFiles) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let builder = rustls::ServerConfig::builder();
    let builder = match &files.client_ca {
        Some(ca) => {
            let roots = roots_of(&read_certs(ca)?).context("--https-client-ca")?;
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .map_err(|e| anyhow!("--https-client-ca: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(read_certs(&files.cert)?, read_key(&files.key)?)
        .with_context(|| {
            format!(
                "--https-cert {} with --https-key {}",
                files.cert.display(),
                files.key.display()
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The files' modification times and lengths: a change of any means a new set.
fn stamps(files: &HttpsFiles) -> [FileStamp; 3] {
    let ca = files.client_ca.as_deref();
    [
        file_stamp(&files.cert),
        file_stamp(&files.key),
        ca.and_then(file_stamp),
    ]
}

/// Loads the files again whenever one changes, until aborted.
pub(crate) async fn watch_files(
    files: HttpsFiles,
    config: watch::Sender<Arc<rustls::ServerConfig>>,
    metrics: Arc<Metrics>,
) {
    let to_load = files.clone();
    let load = move || load(&to_load);
    reload_on_change(
        RELOAD_POLL,
        || stamps(&files),
        load,
        |r| match r {
            Ok(next) => {
                metrics.https_reloads.fetch_add(1, Relaxed);
                let expires_at = crate::preflight::expires_at(&files.cert).unwrap_or(0);
                metrics.https_cert_expires_at.store(expires_at, Relaxed);
                tracing::info!(cert = %files.cert.display(), "IoT API certificate loaded");
                config.send_replace(next);
            }
            Err(e) => {
                metrics.https_reload_failures.fetch_add(1, Relaxed);
                tracing::error!(error = %format!("{e:#}"),
                "IoT API certificate not loaded; the one in force stays");
            }
        },
    )
    .await;
}

/// The connections [`accept_forever`] has finished handshakes with, for `axum::serve`.
pub(crate) struct TlsListener {
    handshaken: mpsc::Receiver<(Counted<TlsStream<tokio::net::TcpStream>>, SocketAddr)>,
    local: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = Counted<TlsStream<tokio::net::TcpStream>>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, SocketAddr) {
        match self.handshaken.recv().await {
            Some(c) => c,
            // The acceptor ended (aborted at shutdown): nothing more comes.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// Starts accepting on `tcp`: the listener to serve, and the task that accepts and
/// handshakes (abort it to stop).
pub(crate) fn listen(
    tcp: TcpListener,
    config: watch::Receiver<Arc<rustls::ServerConfig>>,
    metrics: Arc<Metrics>,
) -> std::io::Result<(TlsListener, tokio::task::JoinHandle<()>)> {
    let local = tcp.local_addr()?;
    let (tx, rx) = mpsc::channel(HANDSHAKEN_QUEUE);
    let task = tokio::spawn(accept_forever(tcp, config, tx, metrics));
    Ok((
        TlsListener {
            handshaken: rx,
            local,
        },
        task,
    ))
}

async fn accept_forever(
    tcp: TcpListener,
    config: watch::Receiver<Arc<rustls::ServerConfig>>,
    handshaken: mpsc::Sender<(Counted<TlsStream<tokio::net::TcpStream>>, SocketAddr)>,
    metrics: Arc<Metrics>,
) {
    let slots = Arc::new(Semaphore::new(crate::listener::MAX_HTTP_CONNECTIONS));
    let mut refused: u64 = 0;
    loop {
        let (stream, peer, slot) =
            crate::listener::accept_bounded(&tcp, &slots, "HTTPS", &mut refused).await;
        let acceptor = TlsAcceptor::from(config.borrow().clone());
        let (handshaken, metrics) = (handshaken.clone(), metrics.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let io = Counted::new(tls, slot, crate::listener::HTTP_IDLE_TIMEOUT);
                    // Fails only when the server has stopped: the connection is dropped.
                    let _ = handshaken.send((io, peer)).await;
                }
                Ok(Err(e)) => {
                    metrics.https_handshake_failures.fetch_add(1, Relaxed);
                    tracing::debug!(%peer, error = %e, "HTTPS handshake failed");
                }
                Err(_) => {
                    metrics.https_handshake_failures.fetch_add(1, Relaxed);
                    tracing::debug!(%peer, "HTTPS handshake timed out");
                }
            }
        });
    }
}
