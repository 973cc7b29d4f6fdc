//! The local diagnostic endpoint: loopback-only HTTP for a technician with physical access.
//!
//! `GET /status` answers the car's state as JSON ([`StatusView`]; `caasctl local status
//! --agent ADDR` prints it). Anything else gets 404 or 405. It serves at most
//! [`MAX_DIAG_CONNECTIONS`] connections at once, reads at most [`MAX_REQUEST_HEAD`] bytes
//! of a request and gives each connection [`DIAG_CONNECTION_TIMEOUT`]: a stuck or hostile
//! client cannot hold the agent.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Most diagnostic connections served at once; more are closed at once.
pub const MAX_DIAG_CONNECTIONS: usize = 8;
/// Longest request head read (request line and headers).
pub const MAX_REQUEST_HEAD: usize = 4096;
/// Time allowed to one connection, request and response.
pub const DIAG_CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// The car's state as `GET /status` answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusView {
    /// The VIN.
    pub vin: String,
    /// The newest applied command's seq (0: none).
    pub applied_seq: u64,
    /// The car's trusted time, ISO-8601 UTC.
    pub car_time: String,
    /// `ONLINE` or `OFFLINE` (the MQTT connection).
    pub connectivity: String,
    /// Firmware version.
    pub firmware_version: String,
    /// Grants in force.
    pub active_grants: Vec<GrantView>,
    /// The newest refusal since boot, or null.
    pub last_rejection: Option<RejectionView>,
    /// Active diagnostic error codes.
    pub error_codes: Vec<String>,
}

/// One grant in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrantView {
    /// The catalog's service id.
    pub service_id: String,
    /// Its feature flags.
    pub flags: Vec<String>,
    /// Its parameters.
    pub parameters: BTreeMap<String, String>,
    /// When it ends, ISO-8601 UTC, or null.
    pub ends_at: Option<String>,
}

/// A refused command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectionView {
    /// Its seq (0 when unreadable).
    pub seq: u64,
    /// The rejection code, e.g. `REPLAY`.
    pub code: String,
}

/// Serves `GET /status` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, status: Arc<Mutex<StatusView>>) {
    let slots = Arc::new(Semaphore::new(MAX_DIAG_CONNECTIONS));
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            // Out of descriptors or similar: do not spin.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let status = status.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(DIAG_CONNECTION_TIMEOUT, answer(sock, status)).await;
        });
    }
}

async fn answer(mut sock: TcpStream, status: Arc<Mutex<StatusView>>) -> std::io::Result<()> {
    let mut head = vec![0u8; MAX_REQUEST_HEAD];
    let mut n = 0;
    while !head[..n].windows(4).any(|w| w == b"\r\n\r\n") {
        if n == head.len() {
            return respond(
                &mut sock,
                "431 Request Header Fields Too Large",
                "text/plain",
                "request too large\n",
            )
            .await;
        }
        let read = sock.read(&mut head[n..]).await?;
        if read == 0 {
            break;
        }
        n += read;
    }
    let text = String::from_utf8_lossy(&head[..n]);
    let mut words = text.lines().next().unwrap_or("").split(' ');
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    match (method, path) {
        ("GET", "/status") => {
            let view = status
                .lock()
                .map(|s| s.clone())
                .unwrap_or_else(|p| p.into_inner().clone());
            let body = serde_json::to_string(&view).unwrap_or_else(|_| "{}".into());
            respond(&mut sock, "200 OK", "application/json", &body).await
        }
        ("GET", _) => {
            respond(
                &mut sock,
                "404 Not Found",
                "text/plain",
                "try GET /status\n",
            )
            .await
        }
        _ => {
            respond(
                &mut sock,
                "405 Method Not Allowed",
                "text/plain",
                "only GET /status\n",
            )
            .await
        }
    }
}

async fn respond(
    sock: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let msg = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(msg.as_bytes()).await?;
    sock.shutdown().await
}
