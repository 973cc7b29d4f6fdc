//! A simulated car around the agent core: an in-memory store, a feature-line table, and
//! the acks and reports the transport would carry.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;

use caas_agent::{Action, Agent, Catalog, Config, MAX_TRUSTED_KEYS};
use caas_protocol::*;

pub const T0: u64 = 1_700_000_000;
pub const CATALOG: Catalog<'static> = Catalog {
    optional: &[
        "power_boost",
        "heated_seats",
        "snow_mode",
        "highway_autopilot",
    ],
    base: &["abs", "airbags"],
};

pub fn vin() -> Vin {
    "WVWZZZ1JZXW000001".parse().unwrap()
}
pub fn other_vin() -> Vin {
    "WVWZZZ1JZXW000002".parse().unwrap()
}
pub fn gateway_key() -> SigningKey {
    SigningKey::from_bytes(&[1; 32])
}
pub fn next_gateway_key() -> SigningKey {
    SigningKey::from_bytes(&[3; 32])
}
pub fn device_key() -> SigningKey {
    SigningKey::from_bytes(&[2; 32])
}

pub fn config_with(keys: &[&SigningKey]) -> Config<Catalog<'static>> {
    let mut trusted_keys = heapless::Vec::<TrustedKey, MAX_TRUSTED_KEYS>::new();
    for k in keys {
        trusted_keys
            .push(TrustedKey::new(k.verifying_key()))
            .unwrap();
    }
    Config {
        vin: vin(),
        trusted_keys,
        device_key: device_key(),
        platform: CATALOG,
        firmware_version: "1.2.3".parse().unwrap(),
        report_interval_secs: 600,
    }
}

pub fn config() -> Config<Catalog<'static>> {
    config_with(&[&gateway_key()])
}

/// A grant of `flags` for `service`, ending at `ends_at`, with one parameter.
pub fn grant(service: &str, flags: &[&str], ends_at: Option<u64>) -> Grant {
    let mut g = Grant::new(service.parse().unwrap());
    for f in flags {
        g.flags.push(f.parse().unwrap()).unwrap();
    }
    g.params
        .push(Param {
            key: "level".parse().unwrap(),
            value: service.parse().unwrap(),
        })
        .unwrap();
    g.ends_at = ends_at;
    g
}

pub fn set_state(seq: u64, issued_at: u64, grants: Vec<Grant>) -> Command {
    let mut desired = DesiredState::default();
    for g in grants {
        desired.grants.push(g).unwrap();
    }
    Command {
        vin: vin(),
        seq,
        issued_at,
        not_after: issued_at + 3600,
        body: CommandBody::SetState(desired),
    }
}

pub fn seal(cmd: &Command, key: &SigningKey) -> Vec<u8> {
    let mut buf = [0u8; MAX_COMMAND_FRAME_SIZE];
    seal_command(cmd, key, &mut buf).unwrap().to_vec()
}

/// What one drain of the agent did, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    Persist,
    On(String),
    Off(String),
    Ack,
    Publish,
}

pub struct Car {
    pub agent: Agent<Catalog<'static>>,
    pub store: Option<Vec<u8>>,
    /// Feature lines on, with their parameters.
    pub lines: BTreeMap<String, Vec<(String, String)>>,
    pub acks: usize,
    pub reports: Vec<Report>,
    /// Fail the next persist (as a full or broken store would).
    pub fail_next_persist: bool,
}

impl Car {
    pub fn boot(config: Config<Catalog<'static>>, store: Option<Vec<u8>>, now: u64) -> Self {
        let agent = Agent::new(config, store.as_deref(), now);
        let mut car = Car {
            agent,
            store,
            lines: BTreeMap::new(),
            acks: 0,
            reports: Vec::new(),
            fail_next_persist: false,
        };
        car.drain();
        car
    }

    pub fn new(now: u64) -> Self {
        Car::boot(config(), None, now)
    }

    /// Power cycle: the lines go dark, the agent boots from the store.
    pub fn reboot(&mut self, config: Config<Catalog<'static>>, now: u64) {
        self.lines.clear();
        self.agent = Agent::new(config, self.store.as_deref(), now);
        self.drain();
    }

    pub fn drain(&mut self) -> Vec<Done> {
        let mut done = Vec::new();
        let mut failed = false;
        loop {
            if failed {
                self.agent.persist_failed();
                failed = false;
            }
            let Some(action) = self.agent.poll_action() else {
                break;
            };
            match action {
                Action::Persist(bytes) => {
                    done.push(Done::Persist);
                    if self.fail_next_persist {
                        self.fail_next_persist = false;
                        failed = true;
                    } else {
                        self.store = Some(bytes.to_vec());
                    }
                }
                Action::SetFeature { flag, on, params } => {
                    if on {
                        done.push(Done::On(flag.to_string()));
                        let params = params
                            .iter()
                            .map(|p| (p.key.to_string(), p.value.to_string()))
                            .collect();
                        self.lines.insert(flag.to_string(), params);
                    } else {
                        done.push(Done::Off(flag.to_string()));
                        assert!(
                            self.lines.remove(flag.as_str()).is_some(),
                            "{flag} switched off but was not on"
                        );
                    }
                }
                Action::Ack => {
                    done.push(Done::Ack);
                    self.acks += 1;
                }
                Action::Publish(frame) => {
                    done.push(Done::Publish);
                    let report = open_report(frame, &TrustedKey::new(device_key().verifying_key()))
                        .expect("every report verifies with the car's key");
                    assert_eq!(report.vin, vin());
                    self.reports.push(report);
                }
            }
            assert!(done.len() < 200, "the agent keeps producing actions");
        }
        done
    }

    pub fn frame(&mut self, frame: &[u8], now: u64) -> Vec<Done> {
        self.agent.handle_frame(frame, now);
        self.drain()
    }

    pub fn command(&mut self, cmd: &Command, now: u64) -> Vec<Done> {
        self.frame(&seal(cmd, &gateway_key()), now)
    }

    pub fn timeout(&mut self, now: u64) -> Vec<Done> {
        self.agent.handle_timeout(now);
        self.drain()
    }

    pub fn last_report(&self) -> &Report {
        self.reports.last().expect("a report was published")
    }

    pub fn lines_on(&self) -> Vec<&str> {
        self.lines.keys().map(|s| s.as_str()).collect()
    }

    pub fn stored(&self) -> caas_agent::PersistedState {
        caas_agent::PersistedState::decode(self.store.as_deref().expect("something stored"))
            .unwrap()
    }
}
