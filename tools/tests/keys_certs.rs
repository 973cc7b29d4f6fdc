#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! `caasctl keys` and `caasctl certs`: the real binary writes real files, which the protocol
//! crate and rustls then load; a real (in-memory) mTLS handshake proves the certificates fit
//! together and that the car's VIN is what the server sees.

mod common;

use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use caas_protocol::{files, verifying_key_from_hex, KeyId, Vin};
use common::{caasctl, s};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection,
};

const VIN: &str = "WVWZZZ1JZXW000001";

#[test]
fn keys_gen_writes_a_pair_the_protocol_crate_loads_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let out = caasctl(&["keys", "gen", "--out", s(dir.path()), "--name", "gateway"]);
    let stdout = out.ok();

    let secret = files::read_signing_key(&dir.path().join("gateway.key")).unwrap();
    let public = files::read_verifying_key(&dir.path().join("gateway.pub")).unwrap();
    assert_eq!(secret.verifying_key(), public);
    let public_hex = caas_protocol::verifying_key_to_hex(&public);
    assert!(stdout.contains(public_hex.as_str()), "{stdout}");
    assert!(stdout.contains(&KeyId::of(&public).to_string()), "{stdout}");

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("gateway.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // A second run changes nothing and says why.
    let before = std::fs::read(dir.path().join("gateway.key")).unwrap();
    let again = caasctl(&["keys", "gen", "--out", s(dir.path()), "--name", "gateway"]);
    assert!(again.err().contains("already exists"), "{}", again.stderr);
    assert_eq!(
        std::fs::read(dir.path().join("gateway.key")).unwrap(),
        before
    );

    // A stray public key alone also blocks, and no secret key appears beside it.
    std::fs::write(dir.path().join("car.pub"), "x\n").unwrap();
    let stray = caasctl(&["keys", "gen", "--out", s(dir.path()), "--name", "car"]);
    assert!(
        stray.err().contains("car.pub already exists"),
        "{}",
        stray.stderr
    );
    assert!(!dir.path().join("car.key").exists());
}

#[test]
fn keys_gen_default_name_json_and_keys_show_agree() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("new/dir");
    let out = caasctl(&["keys", "gen", "--out", s(&sub), "--json"]);
    let v: serde_json::Value = serde_json::from_str(out.ok()).unwrap();
    assert_eq!(v["secretKeyFile"], s(&sub.join("device.key")));
    let public = verifying_key_from_hex(v["publicKey"].as_str().unwrap()).unwrap();
    assert_eq!(v["keyId"], KeyId::of(&public).to_string());

    for file in ["device.key", "device.pub"] {
        let shown = caasctl(&["keys", "show", s(&sub.join(file)), "--json"]);
        let w: serde_json::Value = serde_json::from_str(shown.ok()).unwrap();
        assert_eq!(w["publicKey"], v["publicKey"], "{file}");
        assert_eq!(w["keyId"], v["keyId"], "{file}");
    }

    // An extension that says nothing needs --kind; garbage is refused by name.
    std::fs::copy(sub.join("device.pub"), sub.join("device.hex")).unwrap();
    let unknown = caasctl(&["keys", "show", s(&sub.join("device.hex"))]);
    assert!(unknown.err().contains("--kind"), "{}", unknown.stderr);
    let told = caasctl(&[
        "keys",
        "show",
        s(&sub.join("device.hex")),
        "--kind",
        "public",
    ]);
    assert!(told.ok().contains(v["keyId"].as_str().unwrap()));
    std::fs::write(sub.join("bad.pub"), "not a key\n").unwrap();
    let bad = caasctl(&["keys", "show", s(&sub.join("bad.pub"))]);
    assert!(
        bad.err().contains("bad.pub: a key is 64 hex digits"),
        "{}",
        bad.stderr
    );

    std::fs::write(sub.join("huge.pub"), vec![b'a'; 4096]).unwrap();
    let huge = caasctl(&["keys", "show", s(&sub.join("huge.pub"))]);
    assert!(huge.err().contains("not a key file"), "{}", huge.stderr);

    let name = caasctl(&["keys", "gen", "--out", s(dir.path()), "--name", "../escape"]);
    assert!(name.err().contains("invalid key name"), "{}", name.stderr);
}

fn certs(path: &Path) -> Vec<CertificateDer<'static>> {
    let mut r = BufReader::new(std::fs::File::open(path).unwrap());
    let certs: Vec<_> = rustls_pemfile::certs(&mut r)
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(certs.len(), 1, "{}", path.display());
    certs
}

fn key(path: &Path) -> PrivateKeyDer<'static> {
    let mut r = BufReader::new(std::fs::File::open(path).unwrap());
    rustls_pemfile::private_key(&mut r)
        .unwrap()
        .expect("a private key")
}

fn configs(
    ca_dir: &Path,
    client_dir: &Path,
    client: &str,
) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = RootCertStore::empty();
    roots.add(certs(&ca_dir.join("ca.pem")).remove(0)).unwrap();
    let roots = Arc::new(roots);
    let verifier = WebPkiClientVerifier::builder(roots.clone())
        .build()
        .unwrap();
    let server = ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certs(&ca_dir.join("server.pem")),
            key(&ca_dir.join("server.key")),
        )
        .unwrap();
    let client = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            certs(&client_dir.join(format!("{client}.pem"))),
            key(&client_dir.join(format!("{client}.key"))),
        )
        .unwrap();
    (Arc::new(server), Arc::new(client))
}

fn pump(from: &mut Connection, to: &mut Connection) -> Result<(), rustls::Error> {
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf).unwrap();
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        if to.read_tls(&mut rd).unwrap() == 0 {
            break;
        }
        to.process_new_packets()?;
    }
    Ok(())
}

/// Runs an in-memory handshake to completion (at most 16 flights); returns the server end.
fn handshake(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    name: &str,
) -> Result<ServerConnection, rustls::Error> {
    let server_name = ServerName::try_from(name.to_owned()).unwrap();
    let mut c = Connection::Client(ClientConnection::new(client, server_name)?);
    let mut sv = Connection::Server(ServerConnection::new(server)?);
    for _ in 0..16 {
        pump(&mut c, &mut sv)?;
        pump(&mut sv, &mut c)?;
        if !c.is_handshaking() && !sv.is_handshaking() {
            let Connection::Server(sv) = sv else {
                unreachable!()
            };
            return Ok(sv);
        }
    }
    panic!("handshake did not finish in 16 flights");
}

fn subject(der: &[u8]) -> (String, String) {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned();
    let o = cert
        .subject()
        .iter_organization()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned();
    (cn, o)
}

#[test]
fn certs_init_and_car_make_a_pki_that_rustls_accepts_with_the_vin_as_identity() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("dev");
    caasctl(&["certs", "init", "--out", s(&pki)]).ok();
    for f in [
        "ca.pem",
        "ca.key",
        "server.pem",
        "server.key",
        "gateway.pem",
        "gateway.key",
        "crl.pem",
    ] {
        assert!(pki.join(f).is_file(), "{f} missing");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for f in ["ca.key", "server.key", "gateway.key"] {
            let mode = std::fs::metadata(pki.join(f)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
    }
    let cars = dir.path().join("cars");
    let out = caasctl(&[
        "certs",
        "car",
        "--vin",
        VIN,
        "--ca-dir",
        s(&pki),
        "--out",
        s(&cars),
    ]);
    assert!(out.ok().contains(VIN));

    // Over the DNS name and over the IP address, the server sees the car's VIN in CN and O.
    for name in ["localhost", "127.0.0.1"] {
        let (server, client) = configs(&pki, &cars, VIN);
        let sv = handshake(server, client, name).unwrap();
        let peer = sv
            .peer_certificates()
            .expect("the car presented a certificate");
        assert_eq!(
            subject(&peer[0]),
            (VIN.to_owned(), VIN.to_owned()),
            "{name}"
        );
    }
    // The gateway's client certificate works the same way.
    let (server, client) = configs(&pki, &pki, "gateway");
    let sv = handshake(server, client, "localhost").unwrap();
    assert_eq!(subject(&sv.peer_certificates().unwrap()[0]).0, "gateway");

    // The server certificate is for localhost and 127.0.0.1 only.
    let (server, client) = configs(&pki, &cars, VIN);
    let err = handshake(server, client, "broker.example.com").expect_err("refused");
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                    | rustls::CertificateError::NotValidForNameContext { .. }
            )
        ),
        "{err:?}"
    );
}

#[test]
fn a_car_certificate_from_another_ca_is_refused_and_a_new_init_replaces_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    caasctl(&["certs", "init", "--out", s(&a)]).ok();
    caasctl(&["certs", "init", "--out", s(&b)]).ok();
    // The library API other crates' tests use.
    let vin: Vin = VIN.parse().unwrap();
    let files = caasctl::pki::issue_car_cert(&b, &vin, &b).unwrap();
    assert_eq!(files.cert, b.join(format!("{VIN}.pem")));

    // Broker trusts CA a; the car's certificate is from CA b.
    let (server, _) = configs(&a, &a, "gateway");
    // The car trusts the broker's CA a, so it gets as far as presenting its certificate.
    let mut roots = RootCertStore::empty();
    roots.add(certs(&a.join("ca.pem")).remove(0)).unwrap();
    let client = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            certs(&b.join(format!("{VIN}.pem"))),
            key(&b.join(format!("{VIN}.key"))),
        )
        .unwrap();
    let err = handshake(server, Arc::new(client), "localhost").expect_err("refused");
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
        ),
        "{err:?}"
    );

    // Re-running init over a PKI replaces the CA: certificates of the old one stop verifying.
    let old_ca = std::fs::read(a.join("ca.pem")).unwrap();
    caasctl(&["certs", "init", "--out", s(&a)]).ok();
    assert_ne!(std::fs::read(a.join("ca.pem")).unwrap(), old_ca);
    let leftovers: Vec<_> = std::fs::read_dir(&a)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// A server that checks client certificates against the revocation list `crl` too.
fn server_with_crl(ca_dir: &Path, crl: &Path) -> Arc<ServerConfig> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = RootCertStore::empty();
    roots.add(certs(&ca_dir.join("ca.pem")).remove(0)).unwrap();
    let crls: Vec<_> = rustls_pemfile::crls(&mut BufReader::new(std::fs::File::open(crl).unwrap()))
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(crls.len(), 1, "one list in {}", crl.display());
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
        .with_crls(crls)
        .build()
        .unwrap();
    let config = ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certs(&ca_dir.join("server.pem")),
            key(&ca_dir.join("server.key")),
        )
        .unwrap();
    Arc::new(config)
}

/// The client end of car `vin`'s certificate in `dir`, trusting the CA in `ca_dir`.
fn car_client(ca_dir: &Path, dir: &Path, vin: &str) -> Arc<ClientConfig> {
    configs(ca_dir, dir, vin).1
}

#[test]
fn certs_revoke_puts_a_car_on_the_ca_list_that_rustls_then_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let cars = dir.path().join("cars");
    caasctl(&["certs", "init", "--out", s(&pki)]).ok();
    const VIN2: &str = "WVWZZZ1JZXW000002";
    for vin in [VIN, VIN2] {
        caasctl(&[
            "certs",
            "car",
            "--vin",
            vin,
            "--ca-dir",
            s(&pki),
            "--out",
            s(&cars),
        ])
        .ok();
    }
    let crl = pki.join("crl.pem");
    // init's list names nothing: both cars get in.
    for vin in [VIN, VIN2] {
        handshake(
            server_with_crl(&pki, &crl),
            car_client(&pki, &cars, vin),
            "localhost",
        )
        .unwrap();
    }

    let car1 = cars.join(format!("{VIN}.pem"));
    let out = caasctl(&[
        "certs",
        "revoke",
        "--cert",
        s(&car1),
        "--ca-dir",
        s(&pki),
        "--reason",
        "key-compromise",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(out.ok()).unwrap();
    assert_eq!(v["commonName"], VIN);
    assert_eq!(v["newlyRevoked"], true);
    assert_eq!(v["crlNumber"], 2);
    assert_eq!(v["revokedCount"], 1);
    assert_eq!(v["reason"], "keyCompromise");
    let (_, car1_x509) = x509_parser::pem::parse_x509_pem(&std::fs::read(&car1).unwrap()).unwrap();
    let car1_x509 = car1_x509.parse_x509().unwrap();
    assert_eq!(v["serial"], hex::encode(car1_x509.raw_serial()));

    // The list names car 1 with its reason, and rustls refuses car 1 and takes car 2.
    let (_, pem) = x509_parser::pem::parse_x509_pem(&std::fs::read(&crl).unwrap()).unwrap();
    let (_, list) = x509_parser::parse_x509_crl(&pem.contents).unwrap();
    let entries: Vec<_> = list.iter_revoked_certificates().collect();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].raw_serial(), car1_x509.raw_serial());
    assert_eq!(entries[0].reason_code().map(|(_, r)| r.0), Some(1));
    let err = handshake(
        server_with_crl(&pki, &crl),
        car_client(&pki, &cars, VIN),
        "localhost",
    )
    .expect_err("a revoked certificate was taken");
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
        ),
        "{err:?}"
    );
    handshake(
        server_with_crl(&pki, &crl),
        car_client(&pki, &cars, VIN2),
        "localhost",
    )
    .unwrap();

    // Revoking it again changes nothing, not even the list's number.
    let before = std::fs::read(&crl).unwrap();
    let out = caasctl(&["certs", "revoke", "--cert", s(&car1), "--ca-dir", s(&pki)]);
    assert!(out.ok().contains("already revoked"), "{}", out.stdout);
    assert_eq!(std::fs::read(&crl).unwrap(), before);

    // A second revocation keeps the first: the list grows, numbered one higher.
    let car2 = cars.join(format!("{VIN2}.pem"));
    let out = caasctl(&[
        "certs",
        "revoke",
        "--cert",
        s(&car2),
        "--ca-dir",
        s(&pki),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(out.ok()).unwrap();
    assert_eq!(
        (v["crlNumber"].clone(), v["revokedCount"].clone()),
        (3.into(), 2.into())
    );
    for vin in [VIN, VIN2] {
        handshake(
            server_with_crl(&pki, &crl),
            car_client(&pki, &cars, vin),
            "localhost",
        )
        .expect_err("revoked");
    }

    // A certificate of another CA, or a list another CA signed, is refused; nothing changes.
    let other = dir.path().join("other");
    caasctl(&["certs", "init", "--out", s(&other)]).ok();
    caasctl(&["certs", "car", "--vin", VIN, "--ca-dir", s(&other)]).ok();
    let before = std::fs::read(&crl).unwrap();
    let foreign = other.join(format!("{VIN}.pem"));
    let out = caasctl(&[
        "certs",
        "revoke",
        "--cert",
        s(&foreign),
        "--ca-dir",
        s(&pki),
    ]);
    assert!(
        out.err().contains("not issued by this CA"),
        "{}",
        out.stderr
    );
    assert_eq!(std::fs::read(&crl).unwrap(), before);
    std::fs::copy(other.join("crl.pem"), &crl).unwrap();
    let out = caasctl(&["certs", "revoke", "--cert", s(&car1), "--ca-dir", s(&pki)]);
    assert!(
        out.err().contains("not signed by this CA"),
        "{}",
        out.stderr
    );
    assert_eq!(
        std::fs::read(&crl).unwrap(),
        std::fs::read(other.join("crl.pem")).unwrap()
    );
}

#[test]
fn bad_input_gets_one_clear_line_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    caasctl(&["certs", "init", "--out", s(&pki)]).ok();
    let listing = || {
        let mut v: Vec<_> = std::fs::read_dir(&pki)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    let before = listing();

    for (vin, why) in [
        ("WVWZZZ1JZXW00000", "17 characters"),
        ("WVWZZZ1JZXW00000O", "character 17 is not allowed"),
        ("wvwzzz1jzxw000001", "character 1 is not allowed"),
    ] {
        let out = caasctl(&["certs", "car", "--vin", vin, "--ca-dir", s(&pki)]);
        let line = out.err();
        assert!(line.contains("invalid VIN") && line.contains(why), "{line}");
    }
    let out = caasctl(&[
        "certs",
        "client",
        "--name",
        "caas-gateway",
        "--ca-dir",
        s(&pki),
    ]);
    assert!(
        out.err().contains("ASCII letters and digits"),
        "{}",
        out.stderr
    );
    assert_eq!(listing(), before);
    let out = caasctl(&[
        "certs",
        "client",
        "--name",
        "tester",
        "--ca-dir",
        s(&pki),
        "--out",
        s(dir.path()),
    ]);
    assert!(out.ok().contains("CN = O = tester"));
    assert!(dir.path().join("tester.pem").is_file() && dir.path().join("tester.key").is_file());

    // A directory that cannot be created (its parent is a file): as root, permission bits
    // would not stop us, a file in the way does.
    let file = dir.path().join("plain-file");
    std::fs::write(&file, "x").unwrap();
    let out = caasctl(&["certs", "init", "--out", s(&file.join("sub"))]);
    assert!(
        out.err().contains("cannot create directory"),
        "{}",
        out.stderr
    );
    let out = caasctl(&[
        "certs",
        "car",
        "--vin",
        VIN,
        "--ca-dir",
        s(&pki),
        "--out",
        s(&file.join("sub")),
    ]);
    assert!(
        out.err().contains("cannot create directory"),
        "{}",
        out.stderr
    );
    let out = caasctl(&["keys", "gen", "--out", s(&file.join("sub"))]);
    assert!(out.err().contains("cannot create"), "{}", out.stderr);

    // No CA where --ca-dir points, or a CA whose key is not its own.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = caasctl(&["certs", "car", "--vin", VIN, "--ca-dir", s(&empty)]);
    let line = out.err();
    assert!(
        line.contains("ca.pem") && line.contains("caasctl certs init"),
        "{line}"
    );
    assert!(!empty.join(format!("{VIN}.pem")).exists());

    let other = dir.path().join("other");
    caasctl(&["certs", "init", "--out", s(&other)]).ok();
    std::fs::copy(other.join("ca.key"), pki.join("ca.key")).unwrap();
    let out = caasctl(&["certs", "car", "--vin", VIN, "--ca-dir", s(&pki)]);
    assert!(
        out.err().contains("does not belong to the CA certificate"),
        "{}",
        out.stderr
    );
    assert_eq!(listing(), before);
}
