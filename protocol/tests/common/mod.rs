//! Fixtures shared by the protocol's integration tests and benchmarks.
#![allow(dead_code, clippy::unwrap_used)]

use caas_protocol::*;

pub(crate) const GATEWAY_SEED: [u8; 32] = [0x42; 32];
pub(crate) const CAR_SEED: [u8; 32] = [0x24; 32];
pub(crate) const VIN: &str = "WVWZZZ1JZXW000001";
pub(crate) const OTHER_VIN: &str = "WVWZZZ1JZXW000002";
pub(crate) const ISSUED_AT: u64 = 1_795_000_000;

pub(crate) fn gateway_key() -> SigningKey {
    SigningKey::from_bytes(&GATEWAY_SEED)
}

pub(crate) fn car_key() -> SigningKey {
    SigningKey::from_bytes(&CAR_SEED)
}

pub(crate) fn vin() -> Vin {
    VIN.parse().unwrap()
}

/// A typical activation: a temporary power boost with a parameter, and a permanent feature.
pub(crate) fn typical_command() -> Command {
    let mut boost = Grant::new("power-boost".parse().unwrap());
    boost.flags.push("power_boost".parse().unwrap()).unwrap();
    boost
        .params
        .push(Param {
            key: "boostPercent".parse().unwrap(),
            value: "15".parse().unwrap(),
        })
        .unwrap();
    boost.ends_at = Some(ISSUED_AT + 7 * 86_400);
    let mut seats = Grant::new("heated-seats".parse().unwrap());
    seats.flags.push("heated_seats".parse().unwrap()).unwrap();
    let mut desired = DesiredState::default();
    desired.settles.push(RequestId([0x11; 16])).unwrap();
    desired.grants.push(boost).unwrap();
    desired.grants.push(seats).unwrap();
    Command {
        vin: vin(),
        seq: 7,
        issued_at: ISSUED_AT,
        not_after: ISSUED_AT + 86_400,
        body: CommandBody::SetState(desired),
    }
}

pub(crate) fn typical_report() -> Report {
    let mut active = heapless::Vec::new();
    active
        .push(ActiveService {
            service_id: "power-boost".parse().unwrap(),
            ends_at: Some(ISSUED_AT + 7 * 86_400),
        })
        .unwrap();
    active
        .push(ActiveService {
            service_id: "heated-seats".parse().unwrap(),
            ends_at: None,
        })
        .unwrap();
    let mut error_codes = heapless::Vec::new();
    error_codes.push("TPMS_LOW".parse().unwrap()).unwrap();
    Report {
        vin: vin(),
        applied_seq: 7,
        car_time: ISSUED_AT + 3,
        outcome: Outcome::Applied { seq: 7 },
        active,
        diagnostics: Diagnostics {
            firmware_version: "2.4.1".parse().unwrap(),
            error_codes,
            signal_strength: 87,
        },
    }
}

pub(crate) fn seal_cmd(cmd: &Command, key: &SigningKey) -> Vec<u8> {
    let mut buf = [0u8; MAX_COMMAND_FRAME_SIZE];
    seal_command(cmd, key, &mut buf).unwrap().to_vec()
}

pub(crate) fn seal_rpt(report: &Report, key: &SigningKey) -> Vec<u8> {
    let mut buf = [0u8; MAX_REPORT_FRAME_SIZE];
    seal_report(report, key, &mut buf).unwrap().to_vec()
}

pub(crate) fn trusted_gateway() -> [TrustedKey; 1] {
    [TrustedKey::new(gateway_key().verifying_key())]
}

/// The catalogue of the seed's optional features, plus a base-platform one.
pub(crate) struct Catalog;

impl PlatformFeatures for Catalog {
    fn classify(&self, flag: &FeatureFlag) -> FeatureClass {
        match flag.as_str() {
            "power_boost" | "heated_seats" | "snow_mode" | "highway_autopilot" => {
                FeatureClass::Optional
            }
            "abs" | "airbags" => FeatureClass::Base,
            _ => FeatureClass::Unknown,
        }
    }
}
