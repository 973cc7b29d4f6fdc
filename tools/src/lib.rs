//! # caasctl: the operator and technician CLI
//!
//! `caasctl` is the command line that people (and scripts) use around the CaaS fleet:
//!
//! - [`keys`]: Ed25519 key pairs for the gateway's signing key and each car's device key, in
//!   the hex file format of `caas_protocol::files`;
//! - [`pki`]: the development PKI (a CA, the broker's server certificate, one client
//!   certificate per car whose subject carries the VIN) made with rcgen;
//! - [`frame`]: decoding and verifying a signed command or report frame;
//! - [`local`]: a technician with physical access reading the car agent's loopback
//!   diagnostic endpoint;
//! - [`gateway`]: where the gateway is and its API token, shared by the operator commands;
//! - [`vehicle`]: an operator listing the fleet (filtered by connectivity or a service's
//!   state) and reading a car's state and history from the gateway's IoT API, and replacing
//!   a car's key;
//! - [`requests`]: an operator following an activation, a campaign, and the support tickets
//!   of requests that failed after their retries, from the same API;
//! - [`stats`]: an operator reading the gateway's health and where its requests' time goes,
//!   from its `/metrics`.
//!
//! The binary (`src/main.rs`) only parses arguments ([`cli`]) and prints; everything it does
//! lives in this library so that tests and other crates (the gateway's and simulator's
//! tests, the end-to-end tests) can call it, e.g. [`pki::init_dev_pki`] and
//! [`pki::issue_car_cert`].
#![forbid(unsafe_code)]

pub mod cli;
pub mod frame;
pub mod gateway;
pub mod http;
pub mod keys;
pub mod local;
pub mod pki;
pub mod requests;
pub mod stats;
pub mod table;
pub mod vehicle;
