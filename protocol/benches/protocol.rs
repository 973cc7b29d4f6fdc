//! Encode, decode, sign and verify rates for a typical command and report: the first lines of
//! the system's budget (10,000 signed activations a second on two cores).
//! Run: `cargo bench -p caas-protocol` (criterion prints each rate as elements per second);
//! add `--features batch` for the gateway's batched report opening.
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;

use caas_protocol::*;
use common::*;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

fn rates(c: &mut Criterion) {
    let gateway = gateway_key();
    let car = car_key();
    let trusted = trusted_gateway();
    let car_trusted = TrustedKey::new(car.verifying_key());
    let cmd = typical_command();
    let report = typical_report();
    let cmd_frame = seal_cmd(&cmd, &gateway);
    let report_frame = seal_rpt(&report, &car);
    let cmd_payload = parse_frame(&cmd_frame, FrameKind::Command)
        .unwrap()
        .payload
        .to_vec();
    let report_payload = parse_frame(&report_frame, FrameKind::Report)
        .unwrap()
        .payload
        .to_vec();

    let mut g = c.benchmark_group("command");
    g.throughput(Throughput::Elements(1));
    let mut buf = [0u8; MAX_COMMAND_FRAME_SIZE];
    g.bench_function("encode", |b| {
        b.iter(|| postcard::to_slice(black_box(&cmd), &mut buf).map(|s| s.len()))
    });
    g.bench_function("decode", |b| {
        b.iter(|| postcard::from_bytes::<Command>(black_box(&cmd_payload)))
    });
    g.bench_function("seal (encode+sign)", |b| {
        b.iter(|| seal_command(black_box(&cmd), &gateway, &mut buf).map(|s| s.len()))
    });
    g.bench_function("open (verify+decode)", |b| {
        b.iter(|| open_command(black_box(&cmd_frame), &trusted))
    });
    // A car's gateway key with verification tables (TrustedKey::with_tables), as the Linux
    // agent and the fleet simulator hold it.
    let tabled = [TrustedKey::with_tables(gateway.verifying_key())];
    assert!(tabled[0].has_tables());
    g.bench_function("open (verify with key tables+decode)", |b| {
        b.iter(|| open_command(black_box(&cmd_frame), &tabled))
    });
    // ed25519-dalek's own verify_strict, which the two above replace with the same answers.
    let raw = parse_frame(&cmd_frame, FrameKind::Command).unwrap();
    let signature = ed25519_dalek::Signature::from_bytes(&raw.signature);
    let gateway_public = gateway.verifying_key();
    g.bench_function("ed25519-dalek verify_strict", |b| {
        b.iter(|| gateway_public.verify_strict(black_box(raw.signed), &signature))
    });
    g.finish();

    let mut g = c.benchmark_group("report");
    g.throughput(Throughput::Elements(1));
    let mut buf = [0u8; MAX_REPORT_FRAME_SIZE];
    g.bench_function("encode", |b| {
        b.iter(|| postcard::to_slice(black_box(&report), &mut buf).map(|s| s.len()))
    });
    g.bench_function("decode", |b| {
        b.iter(|| postcard::from_bytes::<Report>(black_box(&report_payload)))
    });
    g.bench_function("seal (encode+sign)", |b| {
        b.iter(|| seal_report(black_box(&report), &car, &mut buf).map(|s| s.len()))
    });
    g.bench_function("open (verify+decode)", |b| {
        b.iter(|| open_report(black_box(&report_frame), &car_trusted))
    });
    g.finish();
    #[cfg(feature = "batch")]
    open_report_batches(c);
}

/// `open_reports` over batches of reports from different cars, per report (the gateway's
/// path; `cargo bench -p caas-protocol --features batch`).
#[cfg(feature = "batch")]
fn open_report_batches(c: &mut Criterion) {
    let mut g = c.benchmark_group("report batch");
    for n in [8u64, 64, 128, 256, 1024] {
        let keys: Vec<SigningKey> = (0..n)
            .map(|i| SigningKey::from_bytes(&[i as u8 + 1; 32]))
            .collect();
        let trusted: Vec<TrustedKey> = keys
            .iter()
            .map(|k| TrustedKey::new(k.verifying_key()))
            .collect();
        let frames: Vec<Vec<u8>> = keys
            .iter()
            .map(|k| seal_rpt(&typical_report(), k))
            .collect();
        let input: Vec<(&[u8], &TrustedKey)> = frames
            .iter()
            .zip(&trusted)
            .map(|(f, k)| (f.as_slice(), k))
            .collect();
        g.throughput(Throughput::Elements(n));
        g.bench_function(format!("open_reports x{n}"), |b| {
            b.iter(|| open_reports(black_box(&input)))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(300)).measurement_time(std::time::Duration::from_secs(1));
    targets = rates
}
criterion_main!(benches);
