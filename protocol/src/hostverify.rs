//! Strict Ed25519 verification on hosts: `verify_strict`'s answers for less work.
//!
//! Ed25519 verification checks `[s]B - [k]A == R`. ed25519-dalek's `verify_strict` computes
//! the left side with one double-scalar multiplication (about 253 point doublings, whatever
//! the key), then encodes it to compare with R's bytes, which costs a field inversion. Two
//! savings, both exact:
//!
//! - The comparison is made between points in projective form, plus a check that R's bytes
//!   are the canonical encoding: no inversion.
//! - For a key a process verifies over and over (a car's trusted gateway key; in the fleet
//!   simulator, one gateway key for thousands of cars) a table of multiples of `-A`, of the
//!   kind curve25519-dalek keeps for `B`, turns `[k](-A)` into 64 additions; `[s]B` then uses
//!   the constant basepoint table.
//!
//! Per command on this project's 2-core machine (best of 40 rounds of 2,000): 33.3 µs for
//! ed25519-dalek's `verify_strict`, 30.8 µs without tables, 24.7 µs with them;
//! `cargo bench -p caas-protocol -- command/` runs the three side by side.
//!
//! The answer is `verify_strict`'s for every input, by its checks: `s` canonical, R's bytes a
//! point that is not of small order, the key not of small order, and the computed point equal
//! to R with R's bytes canonical. The tests hold the two to each other on valid, corrupted
//! and crafted signatures.
//!
//! Tables are only used with the key they were made for (a [`crate::TrustedKey`]'s fields are
//! public, so its key could be replaced under them). A table is about 30 KiB and lives as long
//! as the process: at most [`MAX_KEYS_WITH_TABLES`] keys get one (made once and shared); any
//! further key verifies without, correctly, only slower. Microcontrollers keep ed25519-dalek's
//! `verify_strict` (this module's tables would not fit their RAM).

use std::sync::{Mutex, PoisonError};

use curve25519_dalek::constants::ED25519_BASEPOINT_TABLE;
use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsBasepointTable, EdwardsPoint};
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::BasepointTable;
use sha2::{Digest, Sha512};

use crate::envelope::{canonical_y, SIGNATURE_SIZE};
use crate::keys::VerifyingKey;

/// Keys a process makes verification tables for (about 30 KiB each, kept until it exits).
pub const MAX_KEYS_WITH_TABLES: usize = 16;

/// Multiples of one key's negated point, for verifying its signatures.
pub(crate) struct KeyTables {
    /// The key they were made for: they are used for no other (`TrustedKey::key` is a public
    /// field, so a key and its tables could be parted).
    key: [u8; 32],
    minus_a: EdwardsBasepointTable,
}

impl KeyTables {
    fn new(key: &VerifyingKey) -> KeyTables {
        KeyTables {
            key: key.to_bytes(),
            minus_a: EdwardsBasepointTable::create(&-key.to_edwards()),
        }
    }
}

impl core::fmt::Debug for KeyTables {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("KeyTables")
    }
}

/// The keys given tables so far, in the order they were first asked for.
static MADE: Mutex<Vec<&'static KeyTables>> = Mutex::new(Vec::new());

/// The tables of `key`, made on first use; `None` for a weak key (which `verify_strict`
/// refuses whatever the signature) and once [`MAX_KEYS_WITH_TABLES`] other keys have them.
pub(crate) fn tables_for(key: &VerifyingKey) -> Option<&'static KeyTables> {
    if key.is_weak() {
        return None;
    }
    // A panic elsewhere while holding the lock leaves the list whole (a push is the only
    // change), so a poisoned lock is still good to read.
    let mut made = MADE.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(tables) = made.iter().find(|t| t.key == *key.as_bytes()) {
        return Some(tables);
    }
    if made.len() >= MAX_KEYS_WITH_TABLES {
        return None;
    }
    let tables: &'static KeyTables = Box::leak(Box::new(KeyTables::new(key)));
    made.push(tables);
    Some(tables)
}

/// Whether `signature` is `key`'s over `message`: exactly
/// `key.verify_strict(message, signature).is_ok()`, with `tables` if they were made for `key`.
pub(crate) fn verify(
    tables: Option<&KeyTables>,
    key: &VerifyingKey,
    message: &[u8],
    signature: &[u8; SIGNATURE_SIZE],
) -> bool {
    let mut r_bytes = [0u8; 32];
    r_bytes.copy_from_slice(&signature[..32]);
    let mut s_bytes = [0u8; 32];
    s_bytes.copy_from_slice(&signature[32..]);
    let Some(s) = Option::<Scalar>::from(Scalar::from_canonical_bytes(s_bytes)) else {
        return false;
    };
    let Some(r) = CompressedEdwardsY(r_bytes).decompress() else {
        return false;
    };
    if r.is_small_order() || key.is_weak() {
        return false;
    }
    let k = Scalar::from_hash(
        Sha512::new()
            .chain_update(r_bytes)
            .chain_update(key.as_bytes())
            .chain_update(message),
    );
    let expected = match tables {
        Some(tables) if tables.key == *key.as_bytes() => {
            ED25519_BASEPOINT_TABLE * &s + &tables.minus_a * &k
        }
        _ => EdwardsPoint::vartime_double_scalar_mul_basepoint(&k, &-key.to_edwards(), &s),
    };
    // `verify_strict` compares the computed point's encoding with R's bytes: the same as R
    // being encoded canonically and equal to it as a point (a point with x = 0, whose sign
    // bit could differ, is of small order and already refused).
    canonical_y(&r_bytes) && expected == r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SigningKey;
    use curve25519_dalek::constants::EIGHT_TORSION;
    use ed25519_dalek::{Signature, Signer};
    use proptest::prelude::*;

    fn strict(key: &VerifyingKey, message: &[u8], signature: &[u8; 64]) -> bool {
        key.verify_strict(message, &Signature::from_bytes(signature))
            .is_ok()
    }

    /// `verify_strict`'s answer for one input, after checking that this module's with and
    /// without tables agree with it. The tables are made here, not taken from the process's
    /// bounded set, which one of these tests fills.
    fn answer(key: &VerifyingKey, message: &[u8], signature: &[u8; 64]) -> bool {
        let strict = strict(key, message, signature);
        let tables = (!key.is_weak()).then(|| KeyTables::new(key));
        if let Some(tables) = &tables {
            assert_eq!(
                verify(Some(tables), key, message, signature),
                strict,
                "with tables"
            );
        }
        assert_eq!(
            verify(None, key, message, signature),
            strict,
            "without tables"
        );
        strict
    }

    /// The group order ℓ, little-endian.
    const ORDER: [u8; 32] = [
        0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde,
        0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
    ];

    fn add_le(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
        let mut out = [0u8; 32];
        let mut carry = 0u16;
        for i in 0..32 {
            let sum = u16::from(a[i]) + u16::from(b[i]) + carry;
            out[i] = sum as u8;
            carry = sum >> 8;
        }
        out
    }

    #[test]
    fn a_valid_signature_passes_and_a_changed_message_fails() {
        let sk = SigningKey::from_bytes(&[7; 32]);
        let key = sk.verifying_key();
        let sig = sk.sign(b"caas-cmd frame").to_bytes();
        assert!(answer(&key, b"caas-cmd frame", &sig));
        assert!(!answer(&key, b"caas-cmd framf", &sig));
        let other = SigningKey::from_bytes(&[8; 32]).verifying_key();
        assert!(!answer(&other, b"caas-cmd frame", &sig));
    }

    #[test]
    fn tables_made_for_another_key_are_not_used() {
        // Key A's tables given with key B. A's holder can sign "as B" for those tables: with
        // k hashed over B's bytes, s = r + k·a satisfies [s]B - [k]A = R. It must not pass;
        // B's own signatures still do (the plain way).
        let a = SigningKey::from_bytes(&[15; 32]);
        let b = SigningKey::from_bytes(&[16; 32]);
        let a_tables = KeyTables::new(&a.verifying_key());
        let r = Scalar::from_bytes_mod_order([17; 32]);
        let r_bytes = (ED25519_BASEPOINT_TABLE * &r).compress().to_bytes();
        let k = Scalar::from_hash(
            Sha512::new()
                .chain_update(r_bytes)
                .chain_update(b.verifying_key().as_bytes())
                .chain_update(b"m"),
        );
        let mut as_b = [0u8; 64];
        as_b[..32].copy_from_slice(&r_bytes);
        as_b[32..].copy_from_slice((r + k * a.to_scalar()).as_bytes());
        let expected = ED25519_BASEPOINT_TABLE * &(r + k * a.to_scalar()) + &a_tables.minus_a * &k;
        assert_eq!(
            expected.compress().to_bytes(),
            r_bytes,
            "the equation holds with A's tables"
        );
        assert!(!verify(Some(&a_tables), &b.verifying_key(), b"m", &as_b));
        let by_b = b.sign(b"m").to_bytes();
        assert!(verify(Some(&a_tables), &b.verifying_key(), b"m", &by_b));
        let by_a = a.sign(b"m").to_bytes();
        assert!(verify(Some(&a_tables), &a.verifying_key(), b"m", &by_a));
    }

    #[test]
    fn a_non_canonical_s_is_refused_like_verify_strict() {
        let sk = SigningKey::from_bytes(&[9; 32]);
        let key = sk.verifying_key();
        let mut sig = sk.sign(b"m").to_bytes();
        let mut s = [0u8; 32];
        s.copy_from_slice(&sig[32..]);
        // s + ℓ is the same scalar mod ℓ: a malleated signature the plain equation accepts.
        sig[32..].copy_from_slice(&add_le(&s, &ORDER));
        assert!(!answer(&key, b"m", &sig));
    }

    #[test]
    fn small_order_and_non_canonical_r_are_refused_like_verify_strict() {
        let sk = SigningKey::from_bytes(&[10; 32]);
        let key = sk.verifying_key();
        let good = sk.sign(b"m").to_bytes();
        for torsion in EIGHT_TORSION {
            let mut sig = good;
            sig[..32].copy_from_slice(torsion.compress().as_bytes());
            assert!(!answer(&key, b"m", &sig));
        }
        // y = p + 1 encodes the identity non-canonically; y >= p in general does not decode
        // for verify_strict either.
        let mut sig = good;
        sig[..32].copy_from_slice(&[
            0xee, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xff, 0xff, 0x7f,
        ]);
        assert!(!answer(&key, b"m", &sig));
    }

    #[test]
    fn an_r_with_a_torsion_part_is_refused_like_verify_strict() {
        // R + T for a torsion point T still decompresses and is not of small order; the
        // equation fails for both verifiers (it compares encodings, not cofactored points).
        let sk = SigningKey::from_bytes(&[11; 32]);
        let key = sk.verifying_key();
        let good = sk.sign(b"m").to_bytes();
        let mut r = [0u8; 32];
        r.copy_from_slice(&good[..32]);
        let Some(point) = CompressedEdwardsY(r).decompress() else {
            panic!("a signature's R decodes");
        };
        for torsion in EIGHT_TORSION.iter().skip(1) {
            let mut sig = good;
            sig[..32].copy_from_slice((point + torsion).compress().as_bytes());
            assert!(!answer(&key, b"m", &sig));
        }
    }

    #[test]
    fn a_small_order_r_that_satisfies_the_equation_is_still_refused() {
        // A key with a torsion part, A = aB + T (not weak: 8A is not the identity), signs
        // with R = identity whenever 8 divides k: then [s]B - [k]A = -[k]T = identity for
        // s = ka. The equation holds; only the small-order check refuses it.
        use curve25519_dalek::traits::IsIdentity;
        let a = Scalar::from_bytes_mod_order([13; 32]);
        let torsion = EIGHT_TORSION[1];
        let point = ED25519_BASEPOINT_TABLE * &a + torsion;
        let Ok(key) = VerifyingKey::from_bytes(point.compress().as_bytes()) else {
            panic!("aB + T is a valid point");
        };
        assert!(!key.is_weak());
        let identity = [
            1u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0,
        ];
        let (message, k) = (0u32..1000)
            .map(|n| {
                let message = n.to_le_bytes();
                let k = Scalar::from_hash(
                    Sha512::new()
                        .chain_update(identity)
                        .chain_update(key.as_bytes())
                        .chain_update(message),
                );
                (message, k)
            })
            .find(|(_, k)| (torsion * k).is_identity())
            .unwrap_or_else(|| panic!("one k in eight is a multiple of 8"));
        let mut sig = [0u8; 64];
        sig[..32].copy_from_slice(&identity);
        sig[32..].copy_from_slice((k * a).as_bytes());
        let expected = ED25519_BASEPOINT_TABLE * &(k * a) + &KeyTables::new(&key).minus_a * &k;
        assert!(
            expected.is_identity(),
            "the crafted signature satisfies the equation"
        );
        assert!(!answer(&key, &message, &sig));
    }

    #[test]
    fn a_weak_key_gets_no_tables_and_no_signature_passes() {
        // Under a small-order key A, [s]B - [k]A = R holds for R = [s]B whenever [k]A is the
        // identity (always for A = identity): anyone could sign. Both verifiers refuse.
        let s = Scalar::from_bytes_mod_order([14; 32]);
        let mut sig = [0u8; 64];
        sig[..32].copy_from_slice((ED25519_BASEPOINT_TABLE * &s).compress().as_bytes());
        sig[32..].copy_from_slice(s.as_bytes());
        let mut weak = 0;
        for torsion in EIGHT_TORSION {
            if let Ok(key) = VerifyingKey::from_bytes(torsion.compress().as_bytes()) {
                weak += 1;
                assert!(key.is_weak());
                assert!(tables_for(&key).is_none());
                assert!(!answer(&key, b"anything", &sig));
            }
        }
        assert!(
            weak > 0,
            "small-order keys decode (and are refused by the checks)"
        );
    }

    #[test]
    fn tables_are_made_for_at_most_the_bound_of_keys_and_shared() {
        let key = SigningKey::from_bytes(&[12; 32]).verifying_key();
        let first = tables_for(&key).map(|t| t as *const KeyTables);
        let again = tables_for(&key).map(|t| t as *const KeyTables);
        assert_eq!(first, again, "one key's tables are made once");
        let keys: Vec<VerifyingKey> = (0..=MAX_KEYS_WITH_TABLES as u8)
            .map(|i| SigningKey::from_bytes(&[100 + i; 32]).verifying_key())
            .collect();
        let given = keys.iter().filter(|k| tables_for(k).is_some()).count();
        assert!(given <= MAX_KEYS_WITH_TABLES);
        let made = MADE.lock().unwrap_or_else(PoisonError::into_inner).len();
        assert_eq!(
            made, MAX_KEYS_WITH_TABLES,
            "more keys than the bound fill it, no more"
        );
        let last = keys.last().map(tables_for);
        assert!(
            matches!(last, Some(None)),
            "a key past the bound verifies without tables"
        );
    }

    proptest! {
        #[test]
        fn any_corruption_gets_verify_strict_s_answer(
            seed in any::<[u8; 32]>(),
            message in proptest::collection::vec(any::<u8>(), 0..300),
            at in 0usize..64,
            flip in 1u8..=255,
        ) {
            let sk = SigningKey::from_bytes(&[7; 32]);
            let key = sk.verifying_key();
            let mut signed = seed.to_vec();
            signed.extend_from_slice(&message);
            let good = sk.sign(&signed).to_bytes();
            prop_assert!(answer(&key, &signed, &good));
            let mut bad = good;
            bad[at] ^= flip;
            prop_assert!(!answer(&key, &signed, &bad));
        }
    }
}
