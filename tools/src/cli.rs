//! The command line: argument definitions (clap derive) and what each command prints.
//!
//! Every command prints its result on stdout (a readable form, or JSON with `--json`) and
//! fails with one `error: ...` line on stderr and exit status 1; usage mistakes are clap's
//! (exit status 2).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use caas_protocol::{RequestId, Vin};
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::frame;
use crate::gateway::{self, Gateway};
use crate::http::{Client, TlsOptions};
use crate::keys::{self, KeyFileKind};
use crate::local;
use crate::pki;
use crate::requests;
use crate::stats;
use crate::vehicle;

/// caasctl: the CaaS operator and technician CLI.
#[derive(Debug, Parser)]
#[command(name = "caasctl", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The command groups.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Ed25519 key files (the gateway's signing key, a car's device key).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// The development PKI: CA, broker server certificate, car client certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Signed command and report frames.
    #[command(subcommand)]
    Frame(FrameCommand),
    /// The car agent's local diagnostic endpoint (for a technician at the car).
    #[command(subcommand)]
    Local(LocalCommand),
    /// The fleet, a car's state and history from the gateway's IoT API, and the replacement
    /// of a car's key.
    #[command(subcommand)]
    Vehicle(VehicleCommand),
    /// An activation's or deactivation's state from the gateway's IoT API.
    #[command(subcommand)]
    Request(RequestCommand),
    /// A campaign's progress from the gateway's IoT API.
    #[command(subcommand)]
    Campaign(CampaignCommand),
    /// The gateway itself.
    #[command(subcommand)]
    Gateway(GatewayCommand),
}

/// `caasctl gateway ...`
#[derive(Debug, Subcommand)]
pub enum GatewayCommand {
    /// Request counts, cars, reports, callbacks, and where a request's time goes (the stage
    /// histograms: count, mean, and the bucket bounds under which half and 99% fell), from
    /// GET /metrics.
    Stats {
        /// The gateway.
        #[command(flatten)]
        gateway: GatewayArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The support tickets opened for requests that ended FAILED unconfirmed after their
    /// retries, newest first, with the car's diagnostics (GET /support/tickets).
    Tickets {
        /// Most tickets to show on this page.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=i64::from(gateway::MAX_PAGE_LIMIT)))]
        limit: u32,
        /// Show tickets older than this cursor (the previous page's nextBefore).
        #[arg(long)]
        before: Option<String>,
        /// Only this car's tickets.
        #[arg(long)]
        vin: Option<String>,
        /// The gateway.
        #[command(flatten)]
        gateway: GatewayArgs,
        /// Print the gateway's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// `caasctl request ...`
#[derive(Debug, Subcommand)]
pub enum RequestCommand {
    /// A request's status, phase, attempts, seq, error code and times
    /// (GET /ota/requests/{requestId}).
    Show {
        /// The request id the gateway answered (a UUID).
        request_id: String,
        /// The gateway.
        #[command(flatten)]
        gateway: GatewayArgs,
        /// Print the gateway's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// End a request still in flight: FAILED with CANCELLED, its grant withdrawn from the
    /// car, a FAILED callback (no charge) (POST /ota/requests/{requestId}/cancel). A request
    /// that ended before is left as it is (exit 1).
    Cancel {
        /// The request id the gateway answered (a UUID).
        request_id: String,
        /// The gateway.
        #[command(flatten)]
        gateway: GatewayArgs,
        /// Print the gateway's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// `caasctl campaign ...`
#[derive(Debug, Subcommand)]
pub enum CampaignCommand {
    /// The campaigns, newest first, a page at a time (GET /campaigns).
    List {
        /// Most campaigns to show on this page.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=i64::from(gateway::MAX_PAGE_LIMIT)))]
        limit: u32,
        /// Show campaigns older than this cursor (the previous page's nextBefore).
        #[arg(long)]
        before: Option<String>,
        /// The gateway.
        #[command(flatten)]
        gateway: GatewayArgs,
        /// Print the gateway's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A campaign's action, service, size and its requests counted by state, with its
    /// abort rule (abortWhen) and, if the rule stopped it, when and why
    /// (GET /campaigns/{campaignId}).
    Show {
        /// The campaign id the gateway answered (a UUID).
        campaign_id: String,
        /// The gateway.
        #[command(flatten)]
        gateway: GatewayArgs,
        /// Print the gateway's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A campaign's requests in the order of its VINs, a page at a time, optionally only
    /// those in one state: which cars did it fail on? (GET /campaigns/{campaignId}/requests)
    Requests {
        /// The campaign id the gateway answered (a UUID).
        campaign_id: String,
        /// Only requests in this state.
        #[arg(long, value_parser = ["QUEUED", "IN_PROGRESS", "COMPLETED", "FAILED"])]
        status: Option<String>,
        /// Most requests to show on this page.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=i64::from(gateway::MAX_PAGE_LIMIT)))]
        limit: u32,
        /// Show requests after this cursor (the previous page's nextAfter).
        #[arg(long)]
        after: Option<String>,
        /// The gateway.
        #[command(flatten)]
        gateway: GatewayArgs,
        /// Print the gateway's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a campaign: each of its requests still in flight ends as a cancelled request
    /// does; those the cars confirmed stay (POST /campaigns/{campaignId}/cancel). It can
    /// end thousands of orders at once, so it asks for --yes.
    Cancel {
        /// The campaign id the gateway answered (a UUID).
        campaign_id: String,
        /// Yes, cancel every request of it still in flight.
        #[arg(long)]
        yes: bool,
        /// The gateway.
        #[command(flatten)]
        gateway: GatewayArgs,
        /// Print the gateway's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// `caasctl keys ...`
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Generate an Ed25519 key pair: DIR/NAME.key (secret, mode 0600) and DIR/NAME.pub.
    ///
    /// Both files hold one line of 64 lowercase hex digits (the secret seed, or the public
    /// key), the format of caas_protocol::files. Refuses to overwrite an existing key.
    /// Prints the public key (the IoT API's `publicKey` when provisioning a car) and its key
    /// id (what signed frames carry).
    Gen {
        /// Directory to write into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Base name of the two files.
        #[arg(long, default_value = "device")]
        name: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the public key and key id of a secret (.key) or public (.pub) key file.
    Show {
        /// The key file.
        file: PathBuf,
        /// What the file holds, when its extension (.key / .pub) does not say.
        #[arg(long, value_enum)]
        kind: Option<KeyFileKind>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// `caasctl certs ...`
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Make a new development PKI in DIR: ca.pem/ca.key (the CA), server.pem/server.key (the
    /// broker's, and the IoT API's for --https; localhost and 127.0.0.1), gateway.pem/gateway.key (the gateway's client
    /// certificate). PEM; keys mode 0600. Replaces a PKI already in DIR.
    Init {
        /// Directory to write into (created if missing), e.g. certs/dev.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Issue a car's client certificate, subject CN = O = VIN, signed by the CA in --ca-dir:
    /// VIN.pem and VIN.key. (rumqttd's tenant check reads O, Mosquitto's
    /// use_identity_as_username reads CN.)
    Car {
        /// The car's VIN (17 characters, 0-9 and A-Z except I, O, Q).
        #[arg(long)]
        vin: String,
        /// Directory holding ca.pem and ca.key.
        #[arg(long, value_name = "DIR")]
        ca_dir: PathBuf,
        /// Directory to write into (default: the CA directory).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a certificate the CA in --ca-dir issued (a car's telematics unit replaced,
    /// stolen or scrapped): adds it to the CA's revocation list, DIR/crl.pem, and signs the
    /// list again. The gateway's --mqtts listener (--tls-crl DIR/crl.pem) reads the list
    /// within 2 s, refuses the certificate and closes its live connection; Mosquitto
    /// (crlfile) reads it when restarted. Revoking a certificate twice changes nothing.
    Revoke {
        /// The certificate to revoke (PEM), e.g. DIR/VIN.pem.
        #[arg(long, value_name = "FILE")]
        cert: PathBuf,
        /// Directory holding ca.pem, ca.key and the list (crl.pem).
        #[arg(long, value_name = "DIR")]
        ca_dir: PathBuf,
        /// Why (RFC 5280 reason code in the list).
        #[arg(long, value_enum)]
        reason: Option<pki::Reason>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Issue a TLS server certificate for a host the PKI's server.pem (localhost, 127.0.0.1)
    /// does not name: the gateway's IoT API (--https-cert/--https-key) or a broker on another
    /// machine. Writes STEM.pem and STEM.key (STEM: --file, or the first --name).
    Server {
        /// A DNS name or IP address the certificate is for; repeat for more (the first is
        /// its CN).
        #[arg(long = "name", value_name = "HOST", required = true)]
        names: Vec<String>,
        /// Directory holding ca.pem and ca.key.
        #[arg(long, value_name = "DIR")]
        ca_dir: PathBuf,
        /// Directory to write into (default: the CA directory).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// File name stem (default: the first --name).
        #[arg(long, value_name = "STEM")]
        file: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Issue another client certificate, subject CN = O = NAME (e.g. a second gateway or a
    /// test client): NAME.pem and NAME.key.
    Client {
        /// The identity: 1-64 ASCII letters and digits (rumqttd's rule for a tenant id).
        #[arg(long)]
        name: String,
        /// Directory holding ca.pem and ca.key.
        #[arg(long, value_name = "DIR")]
        ca_dir: PathBuf,
        /// Directory to write into (default: the CA directory).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// `caasctl frame ...`
#[derive(Debug, Subcommand)]
pub enum FrameCommand {
    /// Decode a signed command or report frame and print every field; say whether its
    /// signature verifies with the given key.
    ///
    /// A command is checked with --gateway-key, a report with --car-key; either may be a
    /// public (.pub) or a secret (.key) key file (other extensions are read as public keys).
    /// Exits 1 (after printing) when a given key does not verify the frame, or when the
    /// payload does not decode or breaks a structural rule.
    Inspect {
        /// The frame file, or - for standard input.
        #[arg(default_value = "-")]
        file: PathBuf,
        /// The input is hex text (whitespace ignored) rather than raw bytes.
        #[arg(long)]
        hex: bool,
        /// The gateway's key, to verify a command.
        #[arg(long, value_name = "FILE")]
        gateway_key: Option<PathBuf>,
        /// The car's key, to verify a report.
        #[arg(long, value_name = "FILE")]
        car_key: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// `caasctl local ...`
#[derive(Debug, Subcommand)]
pub enum LocalCommand {
    /// Read the car agent's state from its loopback diagnostic endpoint (GET
    /// http://ADDR/status) and print it as a table, or as the agent's JSON with --json.
    Status {
        /// The agent's diagnostic address, host:port or a base URL.
        #[arg(long, value_name = "ADDR", default_value = local::DEFAULT_AGENT_ADDR)]
        agent: String,
        /// Print the agent's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Where the gateway is and how to authenticate.
#[derive(Debug, Clone, Args)]
pub struct GatewayArgs {
    /// The gateway's base URL.
    #[arg(long, value_name = "URL", env = "CAAS_GATEWAY_URL", default_value = gateway::DEFAULT_GATEWAY_URL)]
    pub gateway: String,
    /// The IoT API bearer token.
    #[arg(long, value_name = "T", env = "CAAS_API_TOKEN", default_value = gateway::DEFAULT_API_TOKEN, hide_env_values = true)]
    pub token: String,
    /// CA certificate(s) (PEM) to trust for an https:// gateway, besides the public roots
    /// (e.g. the development PKI's ca.pem).
    #[arg(long, value_name = "FILE", env = "CAAS_GATEWAY_CA")]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) to present to an https:// gateway that asks for one
    /// (its --https-client-ca); with --client-key.
    #[arg(
        long,
        value_name = "FILE",
        env = "CAAS_CLIENT_CERT",
        requires = "client_key"
    )]
    pub client_cert: Option<PathBuf>,
    /// The private key (PEM) of --client-cert.
    #[arg(
        long,
        value_name = "FILE",
        env = "CAAS_CLIENT_KEY",
        requires = "client_cert"
    )]
    pub client_key: Option<PathBuf>,
}

/// `caasctl vehicle ...`
#[derive(Debug, Subcommand)]
pub enum VehicleCommand {
    /// The registered cars in VIN order, a page at a time, each with its connectivity, last
    /// seen time, services counted by state, firmware and platform, optionally only those in
    /// one connectivity state or with a service in one state: which cars have a failed
    /// service? (GET /vehicles)
    List {
        /// Only cars in this connectivity state.
        #[arg(long, value_parser = vehicle::CONNECTIVITY_STATES)]
        connectivity: Option<String>,
        /// Only cars with at least one service in this state (ERROR: a request of it failed).
        #[arg(long, value_parser = vehicle::SERVICE_STATES)]
        service_status: Option<String>,
        /// Most cars to show on this page.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=i64::from(gateway::MAX_PAGE_LIMIT)))]
        limit: u32,
        /// Show cars after this VIN (the previous page's nextAfter).
        #[arg(long, value_name = "VIN")]
        after: Option<String>,
        /// The gateway.
        #[command(flatten)]
        gateway: GatewayArgs,
        /// Print the gateway's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A car's connectivity, last seen time, active services and diagnostics
    /// (GET /vehicles/{vin}/status).
    Status {
        /// The car's VIN.
        vin: String,
        /// The gateway.
        #[command(flatten)]
        gateway: GatewayArgs,
        /// Print the gateway's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A car's requests, the commands sent to it, its reports, the results and its
    /// connections, newest first (GET /vehicles/{vin}/history).
    History {
        /// The car's VIN.
        vin: String,
        /// Most entries to show.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=i64::from(gateway::MAX_PAGE_LIMIT)))]
        limit: u32,
        /// Show entries older than this cursor (the previous page's nextBefore).
        #[arg(long, value_name = "CURSOR")]
        before: Option<String>,
        /// The gateway.
        #[command(flatten)]
        gateway: GatewayArgs,
        /// Print the gateway's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Replace a car's public key after its telematics unit was replaced: from then on only
    /// reports signed with the new key are believed, and requests in flight complete when
    /// the new unit confirms them (POST /vehicles/{vin}/key). The gateway refuses it (409)
    /// unless --previous-public-key is the car's key now; repeating a replacement that
    /// succeeded changes nothing. The old unit's reports are refused after it, so it asks
    /// for --yes.
    Rekey {
        /// The car's VIN.
        vin: String,
        /// The new unit's public key (64 hex digits, as `caasctl keys show` prints it).
        #[arg(long, value_name = "HEX")]
        public_key: String,
        /// The key the car is registered with now (64 hex digits).
        #[arg(long, value_name = "HEX")]
        previous_public_key: String,
        /// Yes, replace the car's key.
        #[arg(long)]
        yes: bool,
        /// The gateway.
        #[command(flatten)]
        gateway: GatewayArgs,
        /// Print the gateway's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Take a car out of the fleet (scrapped, written off, out of the programme): its
    /// requests in flight end FAILED with DECOMMISSIONED (no charge), a last command withdraws
    /// its grants, its registration ends and its key is free; its history stays, and
    /// registered again its commands go on above its seq (DELETE /vehicles/{vin}). A repeat
    /// changes nothing. It cannot be undone but by registering the car again, so it asks for
    /// --yes.
    Decommission {
        /// The car's VIN.
        vin: String,
        /// Yes, take the car out of the fleet.
        #[arg(long)]
        yes: bool,
        /// The gateway.
        #[command(flatten)]
        gateway: GatewayArgs,
        /// Print the gateway's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn parse_vin(s: &str) -> Result<Vin> {
    s.parse::<Vin>()
        .map_err(|e| anyhow!("invalid VIN {s:?}: {e}"))
}

/// A public key given as `--flag` (64 hex digits), checked before anything is sent.
fn parse_public_key(s: &str, flag: &str) -> Result<caas_protocol::VerifyingKey> {
    caas_protocol::verifying_key_from_hex(s)
        .map_err(|e| anyhow!("invalid {flag} {s:?}: {e} (64 hex digits of an Ed25519 key)"))
}

/// A request or campaign id (`what` says which, for the message). Checked before anything is
/// sent, so that a mistyped id is named as such rather than reported as the gateway's 400.
fn parse_id(s: &str, what: &str) -> Result<RequestId> {
    s.parse::<RequestId>()
        .map_err(|_| anyhow!("invalid {what} {s:?}: a UUID (32 hex digits, dashes optional)"))
}

fn print(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("cannot write to stdout")
}

fn print_json(v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).context("cannot format JSON")?;
    print(&format!("{text}\n"))
}

/// A gateway answer: its JSON as it came with `--json`, else its readable form.
fn print_answer(
    v: &serde_json::Value,
    json: bool,
    text: impl FnOnce(&serde_json::Value) -> String,
) -> Result<()> {
    if json {
        print_json(v)
    } else {
        print(&text(v))
    }
}

fn show(path: &Path) -> String {
    path.display().to_string()
}

/// The whole `caasctl` program: parses the process's command line, runs it, and turns an
/// error into one `error: ...` line on stderr and exit status 1. The binary is only this; the
/// end-to-end tests build it under another name too (`caas-e2e-ctl`), since a package's tests
/// can only run binaries of their own package.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line, whatever the cause chain holds; causes a message already quotes are
            // not repeated.
            let mut msg = String::new();
            for cause in e.chain() {
                let text = cause.to_string();
                if !msg.contains(&text) {
                    if !msg.is_empty() {
                        msg.push_str(": ");
                    }
                    msg.push_str(&text);
                }
            }
            eprintln!("error: {}", msg.replace(['\n', '\r'], " "));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Keys(cmd) => run_keys(cmd),
        Command::Certs(cmd) => run_certs(cmd),
        Command::Frame(cmd) => run_frame(cmd),
        Command::Local(cmd) => run_local(cmd),
        Command::Vehicle(cmd) => run_vehicle(cmd),
        Command::Request(cmd) => run_request(cmd),
        Command::Campaign(cmd) => run_campaign(cmd),
        Command::Gateway(cmd) => run_gateway(cmd),
    }
}

fn run_keys(cmd: KeysCommand) -> Result<()> {
    match cmd {
        KeysCommand::Gen { out, name, json } => {
            let g = keys::generate_key_files(&out, &name)?;
            if json {
                print_json(&json!({
                    "secretKeyFile": show(&g.secret_path), "publicKeyFile": show(&g.public_path),
                    "publicKey": g.info.public_hex(), "keyId": g.info.key_id.to_string(),
                }))
            } else {
                print(&format!(
                    "wrote {} (secret, mode 0600) and {}\npublic key  {}\nkey id      {}\n",
                    show(&g.secret_path),
                    show(&g.public_path),
                    g.info.public_hex(),
                    g.info.key_id
                ))
            }
        }
        KeysCommand::Show { file, kind, json } => {
            let info = keys::read_key_info(&file, kind)?;
            let kind = if info.from_secret { "secret" } else { "public" };
            if json {
                print_json(&json!({
                    "file": show(&file), "kind": kind,
                    "publicKey": info.public_hex(), "keyId": info.key_id.to_string(),
                }))
            } else {
                print(&format!(
                    "file        {} ({kind} key)\npublic key  {}\nkey id      {}\n",
                    show(&file),
                    info.public_hex(),
                    info.key_id
                ))
            }
        }
    }
}

fn run_certs(cmd: CertsCommand) -> Result<()> {
    match cmd {
        CertsCommand::Init { out, json } => {
            let f = pki::init_dev_pki(&out)?;
            if json {
                return print_json(&json!({
                    "caCert": show(&f.ca_cert), "caKey": show(&f.ca_key),
                    "serverCert": show(&f.server_cert), "serverKey": show(&f.server_key),
                    "gatewayCert": show(&f.gateway_cert), "gatewayKey": show(&f.gateway_key),
                    "crl": show(&f.crl),
                }));
            }
            let rows = [
                (
                    pki::CA_CERT,
                    "the CA certificate: brokers and clients trust it".to_owned(),
                ),
                (
                    pki::CA_KEY,
                    "the CA key (secret): issues car certificates".to_owned(),
                ),
                (
                    pki::SERVER_CERT,
                    "the broker's server certificate (localhost, 127.0.0.1)".to_owned(),
                ),
                (pki::SERVER_KEY, "its key (secret)".to_owned()),
                (
                    pki::GATEWAY_CERT,
                    format!(
                        "the gateway's client certificate (CN = O = {})",
                        pki::GATEWAY_IDENTITY
                    ),
                ),
                (pki::GATEWAY_KEY, "its key (secret)".to_owned()),
                (
                    pki::CRL,
                    "the CA's revocation list, empty (certs revoke adds to it)".to_owned(),
                ),
            ];
            let mut text = format!("wrote a development PKI in {}:\n", show(&out));
            for (file, what) in rows {
                text.push_str(&format!("  {file:<12} {what}\n"));
            }
            text.push_str(&format!(
                "next: caasctl certs car --vin VIN --ca-dir {}\n",
                show(&out)
            ));
            print(&text)
        }
        CertsCommand::Car {
            vin,
            ca_dir,
            out,
            json,
        } => {
            let vin = parse_vin(&vin)?;
            let out = out.unwrap_or_else(|| ca_dir.clone());
            let f = pki::issue_car_cert(&ca_dir, &vin, &out)?;
            print_issued(&f, vin.as_str(), json)
        }
        CertsCommand::Revoke {
            cert,
            ca_dir,
            reason,
            json,
        } => {
            let r = pki::revoke_cert(&ca_dir, &cert, reason)?;
            let serial = hex::encode(&r.serial);
            if json {
                return print_json(&json!({
                    "cert": show(&cert), "commonName": r.common_name, "serial": serial,
                    "newlyRevoked": r.newly_revoked, "crl": show(&r.crl),
                    "crlNumber": r.crl_number, "revokedCount": r.revoked_count,
                    "reason": reason.map(pki::Reason::as_str),
                }));
            }
            let what = if r.newly_revoked {
                "revoked"
            } else {
                "was already revoked (nothing changed):"
            };
            print(&format!(
                "{what} {} (CN = {}, serial {serial})\n{} (list number {}) names {} \
                 certificate(s)\nthe gateway (--tls-crl) reads it within 2 s; restart \
                 Mosquitto (crlfile) to apply it there\n",
                show(&cert),
                r.common_name,
                show(&r.crl),
                r.crl_number,
                r.revoked_count
            ))
        }
        CertsCommand::Server {
            names,
            ca_dir,
            out,
            file,
            json,
        } => {
            let out = out.unwrap_or_else(|| ca_dir.clone());
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let f = pki::issue_server_cert(&ca_dir, &names, file.as_deref(), &out)?;
            if json {
                print_json(&json!({"cert": show(&f.cert), "key": show(&f.key), "names": names}))
            } else {
                print(&format!(
                    "wrote {} and {} (secret): server certificate for {}\n",
                    show(&f.cert),
                    show(&f.key),
                    names.join(", ")
                ))
            }
        }
        CertsCommand::Client {
            name,
            ca_dir,
            out,
            json,
        } => {
            let out = out.unwrap_or_else(|| ca_dir.clone());
            let f = pki::issue_client_cert(&ca_dir, &name, &out)?;
            print_issued(&f, &name, json)
        }
    }
}

fn print_issued(f: &pki::CertFiles, identity: &str, json: bool) -> Result<()> {
    if json {
        print_json(
            &json!({"cert": show(&f.cert), "key": show(&f.key), "commonName": identity, "organization": identity}),
        )
    } else {
        print(&format!(
            "wrote {} and {} (secret): client certificate CN = O = {identity}\n",
            show(&f.cert),
            show(&f.key)
        ))
    }
}

fn load_verify_key(path: &Path) -> Result<caas_protocol::VerifyingKey> {
    let kind = KeyFileKind::from_extension(path).unwrap_or(KeyFileKind::Public);
    Ok(keys::read_key_info(path, Some(kind))?.public_key)
}

fn run_frame(cmd: FrameCommand) -> Result<()> {
    let FrameCommand::Inspect {
        file,
        hex,
        gateway_key,
        car_key,
        json,
    } = cmd;
    let gateway_key = gateway_key.as_deref().map(load_verify_key).transpose()?;
    let car_key = car_key.as_deref().map(load_verify_key).transpose()?;
    let bytes = if file.as_os_str() == "-" {
        frame::read_frame(std::io::stdin().lock(), hex)?
    } else {
        let f =
            std::fs::File::open(&file).with_context(|| format!("cannot open {}", show(&file)))?;
        frame::read_frame(f, hex).with_context(|| show(&file))?
    };
    let inspection = frame::inspect(&bytes, gateway_key.as_ref(), car_key.as_ref())?;
    if json {
        print_json(&inspection.to_json())?;
    } else {
        print(&inspection.to_text())?;
    }
    match inspection.problem() {
        Some(p) => bail!(p),
        None => Ok(()),
    }
}

fn run_local(cmd: LocalCommand) -> Result<()> {
    let LocalCommand::Status { agent, json } = cmd;
    let client = Client::new()?;
    let (raw, status) = local::fetch_status(&client, &agent)?;
    if json {
        print_json(&raw)
    } else {
        print(&status.to_text())
    }
}

/// The gateway the arguments name and a client set up to reach it (its TLS options).
fn gateway_of(args: GatewayArgs) -> Result<(Gateway, Client)> {
    let gw = match reqwest::Url::parse(&args.gateway) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => Gateway {
            url: args.gateway,
            token: args.token,
        },
        Ok(_) => bail!(
            "invalid gateway URL {:?}: use http:// or https://",
            args.gateway
        ),
        Err(e) => bail!(
            "invalid gateway URL {:?}: {e} (e.g. {})",
            args.gateway,
            gateway::DEFAULT_GATEWAY_URL
        ),
    };
    let tls = TlsOptions {
        ca: args.ca,
        identity: args.client_cert.zip(args.client_key),
    };
    Ok((gw, Client::with_tls(&tls)?))
}

fn run_gateway(cmd: GatewayCommand) -> Result<()> {
    match cmd {
        GatewayCommand::Stats { gateway, json } => {
            let (gw, client) = gateway_of(gateway)?;
            let text = gw.metrics(&client)?;
            if json {
                print_json(&stats::stats_json(&text))
            } else {
                print(&stats::stats_text(&text))
            }
        }
        GatewayCommand::Tickets {
            limit,
            before,
            vin,
            gateway,
            json,
        } => {
            let vin = vin.as_deref().map(parse_vin).transpose()?;
            let (gw, client) = gateway_of(gateway)?;
            let page = requests::TicketPage {
                limit,
                before: before.as_deref(),
                vin: vin.as_ref(),
            };
            let v = gw.tickets(&client, &page)?;
            print_answer(&v, json, |v| requests::tickets_text(v, &page))
        }
    }
}

fn run_request(cmd: RequestCommand) -> Result<()> {
    let (RequestCommand::Show {
        request_id,
        gateway,
        json,
    }
    | RequestCommand::Cancel {
        request_id,
        gateway,
        json,
    }) = &cmd;
    let id = parse_id(request_id, "request id")?;
    let (gw, client) = gateway_of(gateway.clone())?;
    let v = match cmd {
        RequestCommand::Show { .. } => gw.request(&client, &id)?,
        RequestCommand::Cancel { .. } => gw.cancel_request(&client, &id)?,
    };
    print_answer(&v, *json, requests::request_text)
}

fn run_campaign(cmd: CampaignCommand) -> Result<()> {
    let (campaign_id, gateway, json) = match &cmd {
        CampaignCommand::List {
            limit,
            before,
            gateway,
            json,
        } => {
            let (gw, client) = gateway_of(gateway.clone())?;
            let v = gw.campaigns(&client, *limit, before.as_deref())?;
            return print_answer(&v, *json, |v| requests::campaigns_text(v, *limit));
        }
        CampaignCommand::Requests {
            campaign_id,
            status,
            limit,
            after,
            gateway,
            json,
        } => {
            let id = parse_id(campaign_id, "campaign id")?;
            let (gw, client) = gateway_of(gateway.clone())?;
            let page = requests::CampaignRequestsPage {
                limit: *limit,
                after: after.as_deref(),
                status: status.as_deref(),
            };
            let v = gw.campaign_requests(&client, &id, &page)?;
            return print_answer(&v, *json, |v| {
                requests::campaign_requests_text(v, &id, &page)
            });
        }
        CampaignCommand::Cancel {
            yes: false,
            campaign_id,
            ..
        } => {
            bail!(
                "campaign cancel ends every request of campaign {campaign_id} still in flight; \
                 say --yes to do it (caasctl campaign show {campaign_id} shows its counts)"
            )
        }
        CampaignCommand::Show {
            campaign_id,
            gateway,
            json,
        }
        | CampaignCommand::Cancel {
            campaign_id,
            gateway,
            json,
            ..
        } => (campaign_id, gateway, json),
    };
    let id = parse_id(campaign_id, "campaign id")?;
    let (gw, client) = gateway_of(gateway.clone())?;
    let v = match cmd {
        CampaignCommand::Cancel { .. } => gw.cancel_campaign(&client, &id)?,
        _ => gw.campaign(&client, &id)?,
    };
    print_answer(&v, *json, requests::campaign_text)
}

fn run_vehicle(cmd: VehicleCommand) -> Result<()> {
    match cmd {
        VehicleCommand::List {
            connectivity,
            service_status,
            limit,
            after,
            gateway,
            json,
        } => {
            let after = after.as_deref().map(parse_vin).transpose()?;
            let (gw, client) = gateway_of(gateway)?;
            let page = vehicle::VehiclePage {
                limit,
                after: after.as_ref(),
                connectivity: connectivity.as_deref(),
                service_status: service_status.as_deref(),
            };
            let v = gw.vehicles(&client, &page)?;
            print_answer(&v, json, |v| vehicle::vehicles_text(v, &page))
        }
        VehicleCommand::Status { vin, gateway, json } => {
            let vin = parse_vin(&vin)?;
            let (gw, client) = gateway_of(gateway)?;
            let v = gw.status(&client, &vin)?;
            print_answer(&v, json, vehicle::status_text)
        }
        VehicleCommand::History {
            vin,
            limit,
            before,
            gateway,
            json,
        } => {
            let vin = parse_vin(&vin)?;
            let (gw, client) = gateway_of(gateway)?;
            let v = gw.history(&client, &vin, limit, before.as_deref())?;
            print_answer(&v, json, |v| vehicle::history_text(v, &vin, limit))
        }
        VehicleCommand::Rekey {
            vin,
            public_key,
            previous_public_key,
            yes,
            gateway,
            json,
        } => {
            let vin = parse_vin(&vin)?;
            let key = parse_public_key(&public_key, "--public-key")?;
            let previous = parse_public_key(&previous_public_key, "--previous-public-key")?;
            if !yes {
                bail!(
                    "vehicle rekey replaces car {vin}'s public key: from then on only reports \
                     signed with {public_key} are believed, those signed with \
                     {previous_public_key} are refused; say --yes to do it"
                );
            }
            let (gw, client) = gateway_of(gateway)?;
            let v = gw.replace_key(&client, &vin, &key, &previous)?;
            print_answer(&v, json, vehicle::rekey_text)
        }
        VehicleCommand::Decommission {
            vin,
            yes,
            gateway,
            json,
        } => {
            let vin = parse_vin(&vin)?;
            if !yes {
                bail!(
                    "vehicle decommission takes car {vin} out of the fleet: its requests in \
                     flight end FAILED (DECOMMISSIONED), a last command withdraws its grants, \
                     its registration ends and its key is free; say --yes to do it \
                     (caasctl vehicle status {vin} shows what it has now)"
                );
            }
            let (gw, client) = gateway_of(gateway)?;
            let v = gw.decommission(&client, &vin)?;
            print_answer(&v, json, vehicle::decommission_text)
        }
    }
}
