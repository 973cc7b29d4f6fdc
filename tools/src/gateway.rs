//! The gateway that the operator commands (`vehicle`, `request`, `campaign`, `gateway`) read
//! from: where it is, the token it wants, and the one way they ask it for something, so that
//! every command builds its URL and sends its token alike.

use serde_json::Value;

use crate::http::{trim_base, Client, HttpError};

/// The gateway the tool talks to when neither `--gateway` nor `CAAS_GATEWAY_URL` says.
pub const DEFAULT_GATEWAY_URL: &str = "http://127.0.0.1:8080";
/// The API token used when neither `--token` nor `CAAS_API_TOKEN` says (the development one).
pub const DEFAULT_API_TOKEN: &str = "dev-token";
/// Largest `--limit` of a page (history entries, support tickets): the gateway refuses a
/// larger one, so the tool says so before asking.
pub const MAX_PAGE_LIMIT: u32 = 500;

/// A gateway and the token to use with it.
#[derive(Debug, Clone)]
pub struct Gateway {
    /// Base URL, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    /// Bearer token.
    pub token: String,
}

impl Gateway {
    /// `GET` of `path` (from `/`, with its query; values already percent-encoded) with the
    /// token; the JSON of a 2xx answer.
    pub fn get_json(&self, client: &Client, path: &str) -> Result<Value, HttpError> {
        client.get_json(&self.url_of(path), Some(&self.token))
    }

    /// `POST` (an empty JSON object) to `path` with the token; the JSON of a 2xx answer.
    pub fn post_json(&self, client: &Client, path: &str) -> Result<Value, HttpError> {
        client.post_json(&self.url_of(path), Some(&self.token))
    }

    /// `POST` of `body` as JSON to `path` with the token; the JSON of a 2xx answer.
    pub fn post_json_body(
        &self,
        client: &Client,
        path: &str,
        body: &Value,
    ) -> Result<Value, HttpError> {
        client.post_json_body(&self.url_of(path), Some(&self.token), body)
    }

    /// `DELETE` of `path` with the token; the JSON of a 2xx answer.
    pub fn delete_json(&self, client: &Client, path: &str) -> Result<Value, HttpError> {
        client.delete_json(&self.url_of(path), Some(&self.token))
    }

    /// `GET` of `path` with the token; the text of a 2xx answer.
    pub fn get_text(&self, client: &Client, path: &str) -> Result<String, HttpError> {
        client.get_text(&self.url_of(path), Some(&self.token))
    }

    fn url_of(&self, path: &str) -> String {
        format!("{}{path}", trim_base(&self.url))
    }
}

/// `path?limit=N[&before=CURSOR]`: one page of a listing route, `before` (the previous
/// page's `nextBefore`) percent-encoded.
pub fn page_path(path: &str, limit: u32, before: Option<&str>) -> String {
    listing_path(path, limit, &[("before", before)])
}

/// `path?limit=N[&NAME=VALUE]...`: one page of a listing route with its cursor (`before` or
/// `after`) and filters, in the order given; a parameter without a value is left out, the
/// values are percent-encoded.
pub fn listing_path(path: &str, limit: u32, params: &[(&str, Option<&str>)]) -> String {
    let mut out = format!("{path}?limit={limit}");
    for (name, value) in params {
        if let Some(v) = value {
            out.push_str(&format!("&{name}={}", crate::http::encode_component(v)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_paths_carry_the_given_parameters_encoded() {
        assert_eq!(page_path("/campaigns", 5, None), "/campaigns?limit=5");
        assert_eq!(page_path("/c", 5, Some("a b")), "/c?limit=5&before=a%20b");
        let params = [
            ("after", Some("V1")),
            ("connectivity", None),
            ("serviceStatus", Some("ERROR")),
        ];
        assert_eq!(
            listing_path("/vehicles", 2, &params),
            "/vehicles?limit=2&after=V1&serviceStatus=ERROR"
        );
    }
}
