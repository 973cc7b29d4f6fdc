//! Property tests: any valid command or report survives seal → open unchanged, and any
//! byte string fed to the decoders is refused or accepted without a panic.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;
use caas_protocol::*;
use common::*;
use proptest::prelude::*;

fn vin_strategy() -> impl Strategy<Value = Vin> {
    "[0-9A-HJ-NPR-Z]{17}".prop_map(|s| s.parse().unwrap())
}

fn flag() -> impl Strategy<Value = FeatureFlag> {
    "[a-z0-9_]{1,32}".prop_map(|s| s.parse().unwrap())
}

fn grant(i: usize) -> impl Strategy<Value = Grant> {
    (
        "[A-Za-z0-9_.:-]{1,28}",
        prop::collection::vec(flag(), 1..=MAX_FLAGS_PER_GRANT),
        prop::collection::btree_map(
            "[A-Za-z0-9_]{1,24}",
            "[ -~]{0,24}",
            0..=MAX_PARAMS_PER_GRANT,
        ),
        prop::option::of(any::<u64>()),
    )
        .prop_map(move |(sid, flags, params, ends_at)| {
            // A numeric prefix keeps service ids unique within the command.
            let mut g = Grant::new(
                format!("{i}{sid}")
                    .chars()
                    .take(32)
                    .collect::<String>()
                    .parse()
                    .unwrap(),
            );
            for f in flags {
                g.flags.push(f).unwrap();
            }
            for (k, v) in params {
                g.params
                    .push(Param {
                        key: k.parse().unwrap(),
                        value: v.parse().unwrap(),
                    })
                    .unwrap();
            }
            g.ends_at = ends_at;
            g
        })
}

fn command_strategy() -> impl Strategy<Value = Command> {
    let grants = (0..=MAX_GRANTS).prop_flat_map(|n| (0..n).map(grant).collect::<Vec<_>>());
    (
        vin_strategy(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        prop::collection::vec(any::<[u8; 16]>(), 0..=MAX_SETTLES),
        grants,
        any::<Option<u64>>(),
    )
        .prop_map(|(vin, seq, a, b, settles, grants, query)| {
            let body = match query {
                Some(nonce) => CommandBody::QueryStatus { nonce },
                None => {
                    let mut d = DesiredState::default();
                    settles
                        .into_iter()
                        .for_each(|s| d.settles.push(RequestId(s)).unwrap());
                    grants.into_iter().for_each(|g| d.grants.push(g).unwrap());
                    CommandBody::SetState(d)
                }
            };
            Command {
                vin,
                seq,
                issued_at: a.min(b),
                not_after: a.max(b),
                body,
            }
        })
}

fn report_strategy() -> impl Strategy<Value = Report> {
    (
        vin_strategy(),
        any::<u64>(),
        any::<u64>(),
        prop_oneof![
            any::<u64>().prop_map(|seq| Outcome::Applied { seq }),
            (any::<u64>(), prop::sample::select(RejectCode::ALL.to_vec()))
                .prop_map(|(seq, code)| Outcome::Rejected { seq, code }),
            (
                any::<u64>(),
                prop::sample::select(RejectCode::ALL.to_vec()),
                any::<u8>()
            )
                .prop_map(|(seq, code, grants)| Outcome::GrantsRefused {
                    seq,
                    code,
                    grants
                }),
            any::<u64>().prop_map(|nonce| Outcome::Status { nonce }),
            any::<u64>().prop_map(|counter| Outcome::Periodic { counter }),
        ],
        prop::collection::vec(
            ("[A-Za-z0-9_.:-]{1,32}", any::<Option<u64>>()),
            0..=MAX_GRANTS,
        ),
        "[ -~]{1,24}",
        prop::collection::vec("[A-Za-z0-9_]{1,16}", 0..=MAX_ERROR_CODES),
        0u8..=100,
    )
        .prop_map(
            |(vin, applied_seq, car_time, outcome, active, fw, codes, signal)| {
                let mut r = Report {
                    vin,
                    applied_seq,
                    car_time,
                    outcome,
                    active: heapless::Vec::new(),
                    diagnostics: Diagnostics {
                        firmware_version: fw.parse().unwrap(),
                        error_codes: heapless::Vec::new(),
                        signal_strength: signal,
                    },
                };
                for (sid, ends_at) in active {
                    r.active
                        .push(ActiveService {
                            service_id: sid.parse().unwrap(),
                            ends_at,
                        })
                        .unwrap();
                }
                for c in codes {
                    r.diagnostics.error_codes.push(c.parse().unwrap()).unwrap();
                }
                r
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn commands_round_trip(cmd in command_strategy()) {
        let frame = seal_cmd(&cmd, &gateway_key());
        prop_assert!(frame.len() <= MAX_COMMAND_FRAME_SIZE);
        prop_assert_eq!(open_command(&frame, &trusted_gateway()), Ok(cmd));
    }

    #[test]
    fn reports_round_trip(report in report_strategy()) {
        let frame = seal_rpt(&report, &car_key());
        prop_assert!(frame.len() <= MAX_REPORT_FRAME_SIZE);
        let car = TrustedKey::new(car_key().verifying_key());
        prop_assert_eq!(open_report(&frame, &car), Ok(report));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        prop_assert!(open_command(&bytes, &trusted_gateway()).is_err());
        let car = TrustedKey::new(car_key().verifying_key());
        prop_assert!(open_report(&bytes, &car).is_err());
    }

    #[test]
    fn arbitrary_payloads_decode_or_refuse_without_panic(payload in prop::collection::vec(any::<u8>(), 0..400)) {
        let _ = postcard::from_bytes::<Command>(&payload);
        let _ = postcard::from_bytes::<Report>(&payload);
    }
}
