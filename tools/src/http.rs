//! The small blocking HTTP client `caasctl` uses for the agent's diagnostic endpoint and the
//! gateway's IoT API: JSON in, bounded bodies, timeouts, and the server's own error shown.

use std::io::Read;
use std::time::Duration;

use reqwest::Method;
use serde_json::Value;

/// Largest response body read (a history page of 1000 entries is well under this).
pub const MAX_BODY_SIZE: u64 = 4 * 1024 * 1024;
/// Time allowed to connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for a whole request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest non-JSON error body quoted in a message.
const MAX_QUOTED: usize = 300;

/// Why a request gave no usable JSON.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// The URL could not be built.
    #[error("invalid URL {0}")]
    Url(String),
    /// No answer (connection refused, timeout, TLS...).
    #[error("cannot reach {url}: {reason}")]
    Transport {
        /// The URL.
        url: String,
        /// The cause chain, one line.
        reason: String,
    },
    /// The server answered with an error status; `body` is its JSON error (e.g. the IoT API's
    /// `{"error","field","reason"}`) printed compactly, or its text.
    #[error("{url} answered HTTP {status}: {body}")]
    Status {
        /// The URL.
        url: String,
        /// Status code and reason.
        status: String,
        /// The error body, one line.
        body: String,
        /// The body as JSON, when it was JSON.
        json: Option<Value>,
    },
    /// A TLS file given (a CA to trust, a client certificate) could not be used.
    #[error("{path}: {reason}")]
    Tls {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The body is not JSON or too large.
    #[error("{url} answered something caasctl cannot read: {reason}")]
    Body {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
}

/// Largest CA, certificate or key file read (a CA bundle of a few hundred certificates).
pub const MAX_TLS_FILE: u64 = 1024 * 1024;

/// How to reach an `https://` server whose certificate a private CA signed, or that asks
/// for a client certificate.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// CA certificates (PEM) trusted besides the public roots.
    pub ca: Option<std::path::PathBuf>,
    /// Client certificate and its key (PEM).
    pub identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

fn read_tls_file(path: &std::path::Path) -> Result<Vec<u8>, HttpError> {
    let tls_error = |reason: String| HttpError::Tls {
        path: path.display().to_string(),
        reason,
    };
    let len = std::fs::metadata(path)
        .map_err(|e| tls_error(e.to_string()))?
        .len();
    if len > MAX_TLS_FILE {
        return Err(tls_error(format!(
            "{len} bytes, more than the {MAX_TLS_FILE} such a file may have"
        )));
    }
    std::fs::read(path).map_err(|e| tls_error(e.to_string()))
}

/// A client for `caasctl`'s requests.
#[derive(Debug, Clone)]
pub struct Client {
    inner: reqwest::blocking::Client,
}

/// The causes of `e` on one line. reqwest's own outer message only repeats the URL, which
/// the caller already names, so when there is a cause the chain starts there.
fn chain(e: &dyn std::error::Error) -> String {
    let (first, mut cur) = match e.source() {
        Some(s) => (s.to_string(), s.source()),
        None => (e.to_string(), None),
    };
    let mut parts = vec![first];
    // Error chains are short; the bound only guards against a cycle.
    for _ in 0..8 {
        let Some(s) = cur else { break };
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = s.source();
    }
    parts.join(": ")
}

fn one_line(s: &str) -> String {
    let s: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let s = s.trim();
    if s.chars().count() > MAX_QUOTED {
        format!("{}…", s.chars().take(MAX_QUOTED).collect::<String>())
    } else if s.is_empty() {
        "(empty body)".to_owned()
    } else {
        s.to_owned()
    }
}

impl Client {
    /// A client with [`CONNECT_TIMEOUT`] and [`REQUEST_TIMEOUT`], using rustls (ring).
    pub fn new() -> Result<Self, HttpError> {
        Client::with_tls(&TlsOptions::default())
    }

    /// [`Client::new`] that also trusts `tls.ca` and presents `tls.identity`.
    pub fn with_tls(tls: &TlsOptions) -> Result<Self, HttpError> {
        // rustls 0.23 panics when no crypto provider is chosen and several are compiled in.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::blocking::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("caasctl/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &tls.ca {
            let pem = read_tls_file(path)?;
            let roots = reqwest::Certificate::from_pem_bundle(&pem)
                .ok()
                .filter(|r| !r.is_empty())
                .ok_or_else(|| HttpError::Tls {
                    path: path.display().to_string(),
                    reason: "no PEM certificate in it".to_owned(),
                })?;
            for root in roots {
                builder = builder.add_root_certificate(root);
            }
        }
        if let Some((cert, key)) = &tls.identity {
            let mut pem = read_tls_file(cert)?;
            pem.push(b'\n');
            pem.extend(read_tls_file(key)?);
            let identity = reqwest::Identity::from_pem(&pem).map_err(|e| HttpError::Tls {
                path: format!("{} with {}", cert.display(), key.display()),
                reason: format!("not a PEM certificate and private key: {}", chain(&e)),
            })?;
            builder = builder.identity(identity);
        }
        let inner = builder.build().map_err(|e| HttpError::Transport {
            url: String::new(),
            reason: chain(&e),
        })?;
        Ok(Client { inner })
    }

    /// `GET url` with an optional bearer token; the JSON body of a 2xx answer.
    pub fn get_json(&self, url: &str, token: Option<&str>) -> Result<Value, HttpError> {
        let body = self.exchange(Method::GET, url, token, "application/json", None)?;
        json_of(url, &body)
    }

    /// `POST url` with an empty JSON object as its body (for routes that act on what the
    /// URL names) and an optional bearer token; the JSON body of a 2xx answer.
    pub fn post_json(&self, url: &str, token: Option<&str>) -> Result<Value, HttpError> {
        let body = self.exchange(Method::POST, url, token, "application/json", None)?;
        json_of(url, &body)
    }

    /// `POST url` with `body` as JSON and an optional bearer token; the JSON body of a 2xx
    /// answer.
    pub fn post_json_body(
        &self,
        url: &str,
        token: Option<&str>,
        body: &Value,
    ) -> Result<Value, HttpError> {
        let answer = self.exchange(Method::POST, url, token, "application/json", Some(body))?;
        json_of(url, &answer)
    }

    /// `DELETE url` (no body) with an optional bearer token; the JSON body of a 2xx answer.
    pub fn delete_json(&self, url: &str, token: Option<&str>) -> Result<Value, HttpError> {
        let body = self.exchange(Method::DELETE, url, token, "application/json", None)?;
        json_of(url, &body)
    }

    /// `GET url` with an optional bearer token; the UTF-8 text body of a 2xx answer.
    pub fn get_text(&self, url: &str, token: Option<&str>) -> Result<String, HttpError> {
        let body = self.exchange(Method::GET, url, token, "text/plain", None)?;
        String::from_utf8(body).map_err(|e| HttpError::Body {
            url: url.to_owned(),
            reason: format!("not UTF-8 text ({e})"),
        })
    }

    /// `method url` asking for `accept` (a POST sends `json`, or an empty object); the body of
    /// a 2xx answer (at most [`MAX_BODY_SIZE`]), or the error, with the server's JSON error
    /// body when it sent one.
    fn exchange(
        &self,
        method: Method,
        url: &str,
        token: Option<&str>,
        accept: &str,
        json: Option<&Value>,
    ) -> Result<Vec<u8>, HttpError> {
        let parsed = reqwest::Url::parse(url).map_err(|e| HttpError::Url(format!("{url}: {e}")))?;
        let mut req = self
            .inner
            .request(method.clone(), parsed)
            .header("accept", accept);
        if method == Method::POST {
            let body = json.map_or_else(|| "{}".to_owned(), Value::to_string);
            req = req.header("content-type", "application/json").body(body);
        }
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().map_err(|e| HttpError::Transport {
            url: url.to_owned(),
            reason: chain(&e),
        })?;
        let status = resp.status();
        let mut body = Vec::new();
        resp.take(MAX_BODY_SIZE + 1)
            .read_to_end(&mut body)
            .map_err(|e| HttpError::Transport {
                url: url.to_owned(),
                reason: chain(&e),
            })?;
        if body.len() as u64 > MAX_BODY_SIZE {
            return Err(HttpError::Body {
                url: url.to_owned(),
                reason: format!("the body is larger than {MAX_BODY_SIZE} bytes"),
            });
        }
        if !status.is_success() {
            let (text, json) = match serde_json::from_slice::<Value>(&body) {
                Ok(v) => (v.to_string(), Some(v)),
                Err(_) => (one_line(&String::from_utf8_lossy(&body)), None),
            };
            return Err(HttpError::Status {
                url: url.to_owned(),
                status: status.to_string(),
                body: text,
                json,
            });
        }
        Ok(body)
    }
}

fn json_of(url: &str, body: &[u8]) -> Result<Value, HttpError> {
    serde_json::from_slice(body).map_err(|e| HttpError::Body {
        url: url.to_owned(),
        reason: format!("not JSON ({e})"),
    })
}

/// Percent-encodes one path segment or query value (RFC 3986 unreserved characters kept).
pub fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `base` without trailing slashes, so `base + "/path"` never doubles them.
pub fn trim_base(base: &str) -> &str {
    base.trim_end_matches('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_are_encoded() {
        assert_eq!(encode_component("a b/c?d"), "a%20b%2Fc%3Fd");
        assert_eq!(encode_component("WVWZZZ1JZXW000001"), "WVWZZZ1JZXW000001");
        assert_eq!(trim_base("http://x:1//"), "http://x:1");
    }

    #[test]
    fn error_bodies_become_one_short_line() {
        assert_eq!(one_line("a\nb"), "a b");
        assert_eq!(one_line(""), "(empty body)");
        assert_eq!(one_line(&"x".repeat(1000)).chars().count(), MAX_QUOTED + 1);
    }
}
