//! Decoding a signed command or report frame for people: every header field, every payload
//! field, and whether the signature verifies with a given key.
//!
//! The frame is split with `caas_protocol::parse_frame` (its kind told by the tag in its first
//! 8 bytes) and its payload decoded with postcard, whatever the signature says: an inspector
//! must be able to show a forged or corrupted frame too. Whether it verifies is reported
//! beside the fields ([`SignatureCheck`]), never assumed.

use std::io::Read;

use caas_protocol::{
    parse_frame, refused_places, Command, CommandBody, FrameKind, KeyId, Outcome, RejectCode,
    Report, VerifyingKey, MAX_COMMAND_FRAME_SIZE, MAX_FRAME_SIZE, MAX_REPORT_FRAME_SIZE,
};
use serde_json::{json, Value};

use crate::table::{key_values, unix_to_iso};

/// Most bytes read from the input: a hex dump of the largest frame with generous whitespace.
pub const MAX_INPUT_SIZE: usize = 4 * MAX_FRAME_SIZE;

/// Why a frame cannot be inspected at all.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The input could not be read.
    #[error("cannot read the frame: {0}")]
    Read(#[from] std::io::Error),
    /// The input is longer than any frame.
    #[error("input is larger than {0} bytes, far more than any frame")]
    InputTooLarge(usize),
    /// `--hex` was given but the text is not hex.
    #[error("not hex text: {0}")]
    NotHex(String),
    /// The first 8 bytes are neither tag.
    #[error("not a CaaS frame: it starts with neither \"caas-cmd\" nor \"caas-rpt\"{hint}")]
    UnknownTag {
        /// A suggestion, when the input looks like hex text.
        hint: &'static str,
    },
    /// The protocol crate refused to split it.
    #[error("the {kind} frame cannot be split ({code}): {detail}")]
    Layout {
        /// Command or report.
        kind: &'static str,
        /// The protocol's reason.
        code: RejectCode,
        /// What that means here.
        detail: String,
    },
}

/// Reads a frame from `reader` (at most [`MAX_INPUT_SIZE`] bytes), decoding hex text when `hex`.
pub fn read_frame(reader: impl Read, hex: bool) -> Result<Vec<u8>, FrameError> {
    let mut input = Vec::new();
    reader
        .take(MAX_INPUT_SIZE as u64 + 1)
        .read_to_end(&mut input)?;
    if input.len() > MAX_INPUT_SIZE {
        return Err(FrameError::InputTooLarge(MAX_INPUT_SIZE));
    }
    if !hex {
        return Ok(input);
    }
    let text: Vec<u8> = input
        .into_iter()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let text = text.strip_prefix(b"0x").unwrap_or(&text);
    hex::decode(text).map_err(|e| FrameError::NotHex(e.to_string()))
}

/// What the signature check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignatureCheck {
    /// No key for this kind of frame was given.
    NotChecked {
        /// Which option would check it.
        hint: &'static str,
    },
    /// The frame names another key than the one given.
    KeyIdMismatch {
        /// The id in the frame.
        frame: KeyId,
        /// The given key's id.
        given: KeyId,
    },
    /// Same key id, but the signature does not verify.
    Invalid,
    /// It verifies with the given key.
    Valid,
}

impl SignatureCheck {
    /// Whether a key was given and the frame failed it.
    pub fn failed(&self) -> bool {
        matches!(
            self,
            SignatureCheck::KeyIdMismatch { .. } | SignatureCheck::Invalid
        )
    }

    fn describe(&self) -> String {
        match self {
            SignatureCheck::NotChecked { hint } => format!("not checked ({hint})"),
            SignatureCheck::KeyIdMismatch { frame, given } => {
                format!("DOES NOT VERIFY: signed by key {frame}, the given key is {given}")
            }
            SignatureCheck::Invalid => {
                "DOES NOT VERIFY with the given key (BAD_SIGNATURE)".to_owned()
            }
            SignatureCheck::Valid => "valid (verifies with the given key)".to_owned(),
        }
    }

    fn json(&self) -> Value {
        match self {
            SignatureCheck::NotChecked { .. } => json!({"status": "NOT_CHECKED"}),
            SignatureCheck::KeyIdMismatch { frame, given } => json!({
                "status": "KEY_ID_MISMATCH", "frameKeyId": frame.to_string(), "givenKeyId": given.to_string()
            }),
            SignatureCheck::Invalid => json!({"status": "BAD_SIGNATURE"}),
            SignatureCheck::Valid => json!({"status": "VALID"}),
        }
    }
}

/// The decoded payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// A command.
    Command(Box<Command>),
    /// A report.
    Report(Box<Report>),
    /// The payload does not decode as its kind.
    Undecodable,
}

/// Everything [`inspect`] found out about a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspection {
    /// Command or report.
    pub kind: FrameKind,
    /// Whole frame length.
    pub frame_len: usize,
    /// The format version byte.
    pub version: u8,
    /// The signer's key id.
    pub key_id: KeyId,
    /// Payload length.
    pub payload_len: usize,
    /// The signature bytes, hex.
    pub signature_hex: String,
    /// The payload, decoded.
    pub payload: Payload,
    /// The message's structural check (`check_structure`), when it decoded.
    pub structure: Option<Result<(), RejectCode>>,
    /// The signature check.
    pub signature: SignatureCheck,
}

fn kind_name(kind: FrameKind) -> &'static str {
    match kind {
        FrameKind::Command => "command",
        FrameKind::Report => "report",
    }
}

fn decode<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Option<T> {
    match postcard::take_from_bytes::<T>(payload) {
        Ok((value, [])) => Some(value),
        _ => None,
    }
}

/// Splits, decodes and (when the matching key is given) verifies a frame.
pub fn inspect(
    frame: &[u8],
    gateway_key: Option<&VerifyingKey>,
    car_key: Option<&VerifyingKey>,
) -> Result<Inspection, FrameError> {
    let kind = match frame.get(..8) {
        Some(b"caas-cmd") => FrameKind::Command,
        Some(b"caas-rpt") => FrameKind::Report,
        _ => {
            let looks_hex = !frame.is_empty()
                && frame
                    .iter()
                    .all(|b| b.is_ascii_hexdigit() || b.is_ascii_whitespace());
            return Err(FrameError::UnknownTag {
                hint: if looks_hex {
                    " (it looks like hex text: pass --hex)"
                } else {
                    ""
                },
            });
        }
    };
    let raw = parse_frame(frame, kind).map_err(|code| {
        let max = match kind {
            FrameKind::Command => MAX_COMMAND_FRAME_SIZE,
            FrameKind::Report => MAX_REPORT_FRAME_SIZE,
        };
        let detail = match code {
            RejectCode::TooLarge => format!("{} bytes, the largest is {max}", frame.len()),
            RejectCode::UnsupportedVersion => {
                format!(
                    "format version {}, this caasctl reads version {}",
                    frame[8],
                    caas_protocol::FORMAT_VERSION
                )
            }
            _ => format!(
                "{} bytes do not match the header's payload length (truncated or padded?)",
                frame.len()
            ),
        };
        FrameError::Layout {
            kind: kind_name(kind),
            code,
            detail,
        }
    })?;
    let (payload, structure) = match kind {
        FrameKind::Command => match decode::<Command>(raw.payload) {
            Some(c) => {
                let s = c.check_structure();
                (Payload::Command(Box::new(c)), Some(s))
            }
            None => (Payload::Undecodable, None),
        },
        FrameKind::Report => match decode::<Report>(raw.payload) {
            Some(r) => {
                let s = r.check_structure();
                (Payload::Report(Box::new(r)), Some(s))
            }
            None => (Payload::Undecodable, None),
        },
    };
    let (key, hint) = match kind {
        FrameKind::Command => (
            gateway_key,
            "a command is signed by the gateway: pass --gateway-key",
        ),
        FrameKind::Report => (car_key, "a report is signed by the car: pass --car-key"),
    };
    let signature = match key {
        None => SignatureCheck::NotChecked { hint },
        Some(key) => {
            let given = KeyId::of(key);
            if given != raw.key_id {
                SignatureCheck::KeyIdMismatch {
                    frame: raw.key_id,
                    given,
                }
            } else if raw.verify(key).is_ok() {
                SignatureCheck::Valid
            } else {
                SignatureCheck::Invalid
            }
        }
    };
    Ok(Inspection {
        kind,
        frame_len: frame.len(),
        version: raw.version,
        key_id: raw.key_id,
        payload_len: raw.payload.len(),
        signature_hex: hex::encode(raw.signature),
        payload,
        structure,
        signature,
    })
}

fn time_text(secs: u64) -> String {
    format!("{secs} ({})", unix_to_iso(secs))
}

fn opt_end(end: Option<u64>) -> String {
    end.map_or_else(|| "never (permanent)".to_owned(), time_text)
}

fn time_json(secs: u64) -> Value {
    json!({"unix": secs, "iso": unix_to_iso(secs)})
}

impl Inspection {
    /// The readable form: one `field  value` line each, grants and services indented.
    pub fn to_text(&self) -> String {
        let mut pairs: Vec<(&str, String)> = vec![
            (
                "frame",
                format!(
                    "{} ({}), format version {}, {} bytes",
                    kind_name(self.kind),
                    if self.kind == FrameKind::Command {
                        "caas-cmd"
                    } else {
                        "caas-rpt"
                    },
                    self.version,
                    self.frame_len
                ),
            ),
            ("signer key id", self.key_id.to_string()),
            ("payload", format!("{} bytes", self.payload_len)),
            ("signature", self.signature.describe()),
        ];
        let mut extra = String::new();
        match &self.payload {
            Payload::Undecodable => pairs.push((
                "decoded",
                format!("NO: the payload is not a valid {}", kind_name(self.kind)),
            )),
            Payload::Command(c) => {
                pairs.push(("vin", c.vin.to_string()));
                pairs.push(("seq", c.seq.to_string()));
                pairs.push(("issued at", time_text(c.issued_at)));
                pairs.push(("not after", time_text(c.not_after)));
                match &c.body {
                    CommandBody::QueryStatus { nonce } => {
                        pairs.push(("body", format!("QueryStatus (nonce {nonce})")));
                    }
                    CommandBody::SetState(d) => {
                        pairs.push(("body", format!("SetState: {} grant(s)", d.grants.len())));
                        let settles: Vec<String> =
                            d.settles.iter().map(|r| r.to_string()).collect();
                        pairs.push((
                            "settles",
                            if settles.is_empty() {
                                "-".to_owned()
                            } else {
                                settles.join(", ")
                            },
                        ));
                        for g in &d.grants {
                            extra.push_str(&format!("grant {}\n", g.service_id));
                            let flags: Vec<&str> = g.flags.iter().map(|f| f.as_str()).collect();
                            let params: Vec<String> = g
                                .params
                                .iter()
                                .map(|p| format!("{}={}", p.key, p.value))
                                .collect();
                            let block = key_values(&[
                                ("  flags", flags.join(", ")),
                                (
                                    "  parameters",
                                    if params.is_empty() {
                                        "-".into()
                                    } else {
                                        params.join(" ")
                                    },
                                ),
                                ("  ends at", opt_end(g.ends_at)),
                            ]);
                            extra.push_str(&block);
                        }
                    }
                }
            }
            Payload::Report(r) => {
                pairs.push(("vin", r.vin.to_string()));
                pairs.push(("applied seq", r.applied_seq.to_string()));
                pairs.push(("car time", time_text(r.car_time)));
                pairs.push((
                    "outcome",
                    match r.outcome {
                        Outcome::Applied { seq } => format!("Applied (seq {seq})"),
                        Outcome::Rejected { seq, code } => format!("Rejected (seq {seq}, {code})"),
                        Outcome::GrantsRefused { seq, code, grants } => {
                            let places: Vec<usize> = refused_places(grants).collect();
                            format!("Rejected (seq {seq}, {code}) for grants {places:?} (from 0)")
                        }
                        Outcome::Status { nonce } => format!("Status (nonce {nonce})"),
                        Outcome::Periodic { counter } => format!("Periodic (report #{counter})"),
                    },
                ));
                pairs.push(("firmware", r.diagnostics.firmware_version.to_string()));
                let codes: Vec<&str> = r
                    .diagnostics
                    .error_codes
                    .iter()
                    .map(|c| c.as_str())
                    .collect();
                pairs.push((
                    "error codes",
                    if codes.is_empty() {
                        "-".into()
                    } else {
                        codes.join(", ")
                    },
                ));
                pairs.push(("signal", format!("{}%", r.diagnostics.signal_strength)));
                pairs.push(("active services", r.active.len().to_string()));
                for a in &r.active {
                    extra.push_str(&format!(
                        "  {}  ends at {}\n",
                        a.service_id,
                        opt_end(a.ends_at)
                    ));
                }
            }
        }
        if let Some(Err(code)) = self.structure {
            pairs.push((
                "structure",
                format!("BROKEN ({code}): a car or gateway refuses it"),
            ));
        }
        pairs.push(("signature bytes", self.signature_hex.clone()));
        let mut out = key_values(&pairs);
        out.push_str(&extra);
        out
    }

    /// The same as JSON (for scripts).
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "kind": kind_name(self.kind),
            "frameLen": self.frame_len,
            "formatVersion": self.version,
            "keyId": self.key_id.to_string(),
            "payloadLen": self.payload_len,
            "signature": self.signature.json(),
            "signatureHex": self.signature_hex,
            "structure": match self.structure {
                None => Value::Null,
                Some(Ok(())) => json!("OK"),
                Some(Err(code)) => json!(code.as_str()),
            },
        });
        let decoded = match &self.payload {
            Payload::Undecodable => Value::Null,
            Payload::Command(c) => {
                let body = match &c.body {
                    CommandBody::QueryStatus { nonce } => {
                        json!({"type": "QueryStatus", "nonce": nonce})
                    }
                    CommandBody::SetState(d) => json!({
                        "type": "SetState",
                        "settles": d.settles.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
                        "grants": d.grants.iter().map(|g| json!({
                            "serviceId": g.service_id.as_str(),
                            "flags": g.flags.iter().map(|f| f.as_str()).collect::<Vec<_>>(),
                            "parameters": g.params.iter()
                                .map(|p| (p.key.as_str().to_owned(), json!(p.value.as_str())))
                                .collect::<serde_json::Map<_, _>>(),
                            "endsAt": g.ends_at.map(time_json),
                        })).collect::<Vec<_>>(),
                    }),
                };
                json!({
                    "vin": c.vin.as_str(), "seq": c.seq,
                    "issuedAt": time_json(c.issued_at), "notAfter": time_json(c.not_after),
                    "body": body,
                })
            }
            Payload::Report(r) => {
                let outcome = match r.outcome {
                    Outcome::Applied { seq } => json!({"type": "Applied", "seq": seq}),
                    Outcome::Rejected { seq, code } => {
                        json!({"type": "Rejected", "seq": seq, "code": code.as_str()})
                    }
                    Outcome::GrantsRefused { seq, code, grants } => json!({
                        "type": "GrantsRefused", "seq": seq, "code": code.as_str(),
                        "grants": refused_places(grants).collect::<Vec<_>>(),
                    }),
                    Outcome::Status { nonce } => json!({"type": "Status", "nonce": nonce}),
                    Outcome::Periodic { counter } => {
                        json!({"type": "Periodic", "counter": counter})
                    }
                };
                json!({
                    "vin": r.vin.as_str(), "appliedSeq": r.applied_seq, "carTime": time_json(r.car_time),
                    "outcome": outcome,
                    "active": r.active.iter().map(|a| json!({
                        "serviceId": a.service_id.as_str(), "endsAt": a.ends_at.map(time_json)
                    })).collect::<Vec<_>>(),
                    "diagnostics": {
                        "firmwareVersion": r.diagnostics.firmware_version.as_str(),
                        "errorCodes": r.diagnostics.error_codes.iter().map(|c| c.as_str()).collect::<Vec<_>>(),
                        "networkSignalStrength": r.diagnostics.signal_strength,
                    },
                })
            }
        };
        if let Some(obj) = v.as_object_mut() {
            obj.insert("decoded".to_owned(), decoded);
        }
        v
    }

    /// Why the frame must not be trusted, if it must not: a failed signature, an undecodable
    /// payload or a broken structure (the caller turns it into a non-zero exit).
    pub fn problem(&self) -> Option<String> {
        if self.signature.failed() {
            return Some(format!(
                "signature check failed: {}",
                self.signature.describe()
            ));
        }
        if self.payload == Payload::Undecodable {
            return Some(format!(
                "the payload does not decode as a {}",
                kind_name(self.kind)
            ));
        }
        if let Some(Err(code)) = self.structure {
            return Some(format!(
                "the {} breaks a structural rule ({code})",
                kind_name(self.kind)
            ));
        }
        None
    }
}
