//! The IoT API's TCP listener for axum: TCP_NODELAY on every connection (an answer written
//! in two pieces must not wait for the client's delayed ACK), at most
//! [`MAX_HTTP_CONNECTIONS`] connections at once, past which new ones are closed on accept,
//! as the MQTT fronts do ([`crate::tlsfront::MAX_CONNECTIONS`]), and a connection that sends
//! nothing for [`HTTP_IDLE_TIMEOUT`] is closed (axum's server has no timer of its own, so
//! idle or trickling sockets could otherwise hold every slot for ever).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Most HTTP connections open at once. Callers are the CaaS core, operators and
/// technicians' tools (a few pooled connections each), so this only bounds what a
/// misbehaving client can hold: each connection is a task and its buffers.
pub(crate) const MAX_HTTP_CONNECTIONS: usize = 4_096;
/// How long a connection may send nothing while the server waits to read from it. Longer
/// than common clients keep an idle pooled connection (reqwest: 90 s), so that they close
/// first and never reuse one we are closing.
pub(crate) const HTTP_IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// A [`TcpListener`] that sets TCP_NODELAY and bounds the connections it hands out.
pub(crate) struct BoundedListener {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    idle_timeout: Duration,
    refused: u64,
}

impl BoundedListener {
    pub(crate) fn new(inner: TcpListener, limit: usize, idle_timeout: Duration) -> BoundedListener {
        BoundedListener {
            inner,
            slots: Arc::new(Semaphore::new(limit)),
            idle_timeout,
            refused: 0,
        }
    }
}

impl axum::serve::Listener for BoundedListener {
    type Io = Counted<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Counted<TcpStream>, SocketAddr) {
        let (stream, peer, slot) =
            accept_bounded(&self.inner, &self.slots, "HTTP", &mut self.refused).await;
        (Counted::new(stream, slot, self.idle_timeout), peer)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// The next connection `tcp` accepts for which `slots` has a slot, with TCP_NODELAY set and
/// the slot, which it holds until dropped. Connections past the slots are closed at once
/// (`refused` counts them; logged at each power of two, so a flood does not flood the log).
/// `what` names the listener in the log.
pub(crate) async fn accept_bounded(
    tcp: &TcpListener,
    slots: &Arc<Semaphore>,
    what: &str,
    refused: &mut u64,
) -> (TcpStream, SocketAddr, OwnedSemaphorePermit) {
    loop {
        let (stream, peer) = match tcp.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors or memory: wait instead of spinning.
                tracing::warn!(error = %e, "{what} accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            *refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(%peer, refused = *refused,
                    "{what} connection limit reached; new connections closed");
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        return (stream, peer, slot);
    }
}

/// A connection holding its slot until it is dropped (plain TCP, or TLS for `--https`),
/// closed when it sends nothing for its idle timeout.
pub(crate) struct Counted<S> {
    stream: S,
    _slot: OwnedSemaphorePermit,
    idle_timeout: Duration,
    /// Fires [`Self::idle_timeout`] after the last bytes read.
    idle: Pin<Box<tokio::time::Sleep>>,
}

impl<S> Counted<S> {
    pub(crate) fn new(stream: S, slot: OwnedSemaphorePermit, idle_timeout: Duration) -> Self {
        Counted {
            stream,
            _slot: slot,
            idle_timeout,
            idle: Box::pin(tokio::time::sleep(idle_timeout)),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                let next = tokio::time::Instant::now() + self.idle_timeout;
                self.idle.as_mut().reset(next);
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match self.idle.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "HTTP connection idle too long",
                ))),
                Poll::Pending => Poll::Pending,
            },
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::serve::Listener;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn connections_past_the_limit_are_closed_and_a_freed_slot_is_reused() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let mut listener = BoundedListener::new(tcp, 1, HTTP_IDLE_TIMEOUT);
        let first = TcpStream::connect(addr).await.unwrap();
        let (held, _) = listener.accept().await;
        assert!(held.stream.nodelay().unwrap(), "TCP_NODELAY set");

        // The second connection is accepted by the kernel, then closed by the listener
        // while it waits for a third, which it keeps once the first slot is free.
        let mut second = TcpStream::connect(addr).await.unwrap();
        let accepting = tokio::spawn(async move {
            let (io, _) = listener.accept().await;
            io
        });
        let mut byte = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(10), second.read(&mut byte)).await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "over the limit: closed, got {closed:?}"
        );
        drop(held);
        drop(first);
        let _third = TcpStream::connect(addr).await.unwrap();
        let kept = tokio::time::timeout(Duration::from_secs(10), accepting).await;
        assert!(matches!(kept, Ok(Ok(_))), "a freed slot is used again");
    }

    #[tokio::test]
    async fn a_connection_that_sends_nothing_is_closed_and_one_that_talks_is_kept() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let idle = Duration::from_millis(300);
        let mut listener = BoundedListener::new(tcp, 2, idle);
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (mut served, _) = listener.accept().await;
        // Bytes every 100 ms keep it open well past the idle time.
        for _ in 0..6 {
            client.write_all(b"x").await.unwrap();
            let mut byte = [0u8; 1];
            assert_eq!(served.read(&mut byte).await.unwrap(), 1);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut byte = [0u8; 1];
        let silent = tokio::time::timeout(Duration::from_secs(10), served.read(&mut byte)).await;
        assert!(
            matches!(&silent, Ok(Err(e)) if e.kind() == io::ErrorKind::TimedOut),
            "{silent:?}"
        );
    }
}
