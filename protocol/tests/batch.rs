//! `open_reports` gives every frame exactly the answer `open_report` gives it.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use caas_protocol::*;
use common::*;
use proptest::prelude::*;

fn car(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n.wrapping_add(1); 32])
}

fn report_of(n: u8, applied_seq: u64) -> Vec<u8> {
    let mut report = typical_report();
    report.applied_seq = applied_seq;
    report.diagnostics.signal_strength = n % 100;
    seal_rpt(&report, &car(n))
}

fn paired<'a>(frames: &'a [Vec<u8>], keys: &'a [TrustedKey]) -> Vec<(&'a [u8], &'a TrustedKey)> {
    frames
        .iter()
        .zip(keys)
        .map(|(f, k)| (f.as_slice(), k))
        .collect()
}

fn one_by_one(frames: &[(&[u8], &TrustedKey)]) -> Vec<Result<Report, RejectCode>> {
    frames.iter().map(|(f, k)| open_report(f, k)).collect()
}

#[test]
fn a_batch_of_good_reports_opens_like_each_alone() {
    let keys: Vec<TrustedKey> = (0..16)
        .map(|n| TrustedKey::new(car(n).verifying_key()))
        .collect();
    let frames: Vec<Vec<u8>> = (0..16).map(|n| report_of(n, u64::from(n) + 1)).collect();
    let input = paired(&frames, &keys);
    let batch = open_reports(&input);
    assert!(batch.iter().all(Result::is_ok));
    assert_eq!(batch, one_by_one(&input));
}

#[test]
fn one_bad_signature_fails_alone_and_the_rest_still_open() {
    let keys: Vec<TrustedKey> = (0..8)
        .map(|n| TrustedKey::new(car(n).verifying_key()))
        .collect();
    let mut frames: Vec<Vec<u8>> = (0..8).map(|n| report_of(n, 3)).collect();
    // Frame 5 signed by car 6 but naming car 5's key id: a forgery.
    let mut forged = report_of(6, 3);
    forged[9..17].copy_from_slice(&keys[5].id.0);
    frames[5] = forged;
    let input = paired(&frames, &keys);
    let batch = open_reports(&input);
    assert_eq!(batch[5], Err(RejectCode::BadSignature));
    assert_eq!(batch.iter().filter(|r| r.is_ok()).count(), 7);
    assert_eq!(batch, one_by_one(&input));
}

#[test]
fn small_order_or_non_canonical_r_is_refused_as_verify_strict_refuses_it() {
    let key = TrustedKey::new(car(1).verifying_key());
    let good = report_of(1, 2);
    let sig_at = good.len() - SIGNATURE_SIZE;
    let mut identity_r = good.clone();
    identity_r[sig_at..sig_at + 32].fill(0);
    identity_r[sig_at] = 1;
    let mut negative_zero_r = identity_r.clone();
    negative_zero_r[sig_at + 31] = 0x80;
    let mut non_canonical_r = good.clone();
    non_canonical_r[sig_at..sig_at + 32].fill(0xff);
    let frames = [
        good.clone(),
        identity_r,
        negative_zero_r,
        non_canonical_r,
        good,
    ];
    let input: Vec<(&[u8], &TrustedKey)> = frames.iter().map(|f| (f.as_slice(), &key)).collect();
    let batch = open_reports(&input);
    assert!(batch[0].is_ok() && batch[4].is_ok());
    for r in &batch[1..4] {
        assert_eq!(*r, Err(RejectCode::BadSignature));
    }
    assert_eq!(batch, one_by_one(&input));
}

#[test]
fn envelope_errors_come_back_per_frame() {
    let key = TrustedKey::new(car(2).verifying_key());
    let other = TrustedKey::new(car(3).verifying_key());
    let good = report_of(2, 9);
    let cmd = seal_cmd(&typical_command(), &car(2));
    let input: Vec<(&[u8], &TrustedKey)> = vec![
        (&good, &key),
        (&good[..40], &key),
        (&good, &other),
        (&cmd, &key),
        (&good, &key),
    ];
    let batch = open_reports(&input);
    assert_eq!(batch[1], Err(RejectCode::Malformed));
    assert_eq!(batch[2], Err(RejectCode::UnknownKey));
    assert_eq!(batch[3], Err(RejectCode::Malformed));
    assert_eq!(batch, one_by_one(&input));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Any mix of good frames and frames with one flipped byte opens exactly as one by one.
    #[test]
    fn any_mix_opens_like_one_by_one(flips in proptest::collection::vec(proptest::option::of((0usize..200, 1u8..=255)), 1..12)) {
        let keys: Vec<TrustedKey> = (0..flips.len() as u8)
            .map(|n| TrustedKey::new(car(n).verifying_key()))
            .collect();
        let frames: Vec<Vec<u8>> = flips
            .iter()
            .enumerate()
            .map(|(n, flip)| {
                let mut f = report_of(n as u8, 4);
                if let Some((at, x)) = flip {
                    let at = at % f.len();
                    f[at] ^= x;
                }
                f
            })
            .collect();
        let input = paired(&frames, &keys);
        prop_assert_eq!(open_reports(&input), one_by_one(&input));
    }
}
