//! Fault injection: which cars misbehave, and how.
//!
//! Every fault is a share of the fleet (a ratio) and, where it makes sense, a duration. Which
//! cars get a fault is decided from the car's index and the fault's kind by a fixed hash, so a
//! run is reproducible and a test can know exactly which cars were made to fail (see
//! [`FaultPlan::describe`] and `caas-sim fleet --faults-out`). The fault sets of different
//! kinds are independent.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The faults of a fleet run (all off by default).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct FaultPlan {
    /// Share of cars that stay offline at start, for [`FaultPlan::offline_for`].
    #[serde(default)]
    pub offline_at_start: f64,
    /// How long those cars stay offline.
    #[serde(default, with = "opt_duration")]
    pub offline_for: Option<Duration>,
    /// Share of cars that drop (acknowledge and ignore) every command.
    #[serde(default)]
    pub drop_commands: f64,
    /// How long those cars drop commands, from their start; `None` means for ever (a car that
    /// never answers).
    #[serde(default, with = "opt_duration")]
    pub drop_for: Option<Duration>,
    /// Share of cars that refuse to apply: their store fails, so the core reports
    /// `STORAGE_FAILED` and does not acknowledge.
    #[serde(default)]
    pub refuse: f64,
    /// Delay before each car handles a received command (network latency).
    #[serde(default, with = "opt_duration")]
    pub net_delay: Option<Duration>,
    /// Share of cars that drop their connection and reconnect every
    /// [`FaultPlan::storm_every`] (a reconnect storm).
    #[serde(default)]
    pub storm: f64,
    /// Interval of the reconnect storm.
    #[serde(default, with = "opt_duration")]
    pub storm_every: Option<Duration>,
    /// Share of received command frames that get one byte flipped before the core sees them.
    #[serde(default)]
    pub corrupt: f64,
}

/// A fault kind, the key of its independent selection hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// Offline at start.
    Offline = 1,
    /// Drops commands.
    Drop = 2,
    /// Refuses to apply.
    Refuse = 3,
    /// Takes part in reconnect storms.
    Storm = 4,
}

/// The faults one car has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CarFaults {
    /// Connects only after this long.
    pub offline_for: Option<Duration>,
    /// Drops commands (`Some(None)`: for ever; `Some(Some(d))`: for `d` from start).
    pub drop: Option<Option<Duration>>,
    /// Refuses to apply.
    pub refuse: bool,
    /// Drops its connection every this long.
    pub storm_every: Option<Duration>,
}

impl CarFaults {
    /// Short text for `--faults-out`: `offline,drop,refuse,storm` or `-`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.offline_for.is_some() {
            parts.push("offline");
        }
        match self.drop {
            Some(None) => parts.push("silent"),
            Some(Some(_)) => parts.push("drop"),
            None => {}
        }
        if self.refuse {
            parts.push("refuse");
        }
        if self.storm_every.is_some() {
            parts.push("storm");
        }
        if parts.is_empty() {
            "-".to_string()
        } else {
            parts.join(",")
        }
    }
}

/// A well-mixed value in `[0, 1)` for (car index, fault kind): splitmix64.
pub fn unit_hash(index: u64, kind: FaultKind) -> f64 {
    let mut z = index
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((kind as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

impl FaultPlan {
    /// Checks the ratios.
    pub fn validate(&self) -> Result<(), String> {
        for (name, r) in [
            ("offline_at_start", self.offline_at_start),
            ("drop_commands", self.drop_commands),
            ("refuse", self.refuse),
            ("storm", self.storm),
            ("corrupt", self.corrupt),
        ] {
            if !(0.0..=1.0).contains(&r) {
                return Err(format!("fault {name}: ratio {r} is not between 0 and 1"));
            }
        }
        Ok(())
    }

    /// The faults of car `index`.
    pub fn for_car(&self, index: u64) -> CarFaults {
        let hit = |ratio: f64, kind| ratio > 0.0 && unit_hash(index, kind) < ratio;
        CarFaults {
            offline_for: hit(self.offline_at_start, FaultKind::Offline)
                .then(|| self.offline_for.unwrap_or(Duration::from_secs(10))),
            drop: hit(self.drop_commands, FaultKind::Drop).then_some(self.drop_for),
            refuse: hit(self.refuse, FaultKind::Refuse),
            storm_every: hit(self.storm, FaultKind::Storm)
                .then(|| self.storm_every.unwrap_or(Duration::from_secs(5))),
        }
    }

    /// Whether any fault is set.
    pub fn any(&self) -> bool {
        self.offline_at_start > 0.0
            || self.drop_commands > 0.0
            || self.refuse > 0.0
            || self.storm > 0.0
            || self.corrupt > 0.0
            || self.net_delay.is_some()
    }
}

mod opt_duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub(super) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&format!("{}ms", d.as_millis())),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        text.map(|t| crate::parse_duration(&t).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_follows_the_ratio_and_is_reproducible() {
        let plan = FaultPlan {
            drop_commands: 0.3,
            ..FaultPlan::default()
        };
        let hits = (0..10_000)
            .filter(|&i| plan.for_car(i).drop.is_some())
            .count();
        assert!((2_700..3_300).contains(&hits), "{hits}");
        assert_eq!(plan.for_car(17), plan.for_car(17));
        assert!((0..1000).all(|i| plan.for_car(i).storm_every.is_none()));
        let none = FaultPlan::default();
        assert!((0..1000).all(|i| none.for_car(i) == CarFaults::default()));
    }

    #[test]
    fn bad_ratios_are_refused() {
        let plan = FaultPlan {
            refuse: 1.2,
            ..FaultPlan::default()
        };
        assert!(plan.validate().is_err());
    }

    #[test]
    fn plans_read_from_toml() {
        let plan: FaultPlan =
            toml::from_str("drop_commands = 0.3\ndrop_for = \"5s\"\nstorm = 0.1\n").unwrap();
        assert_eq!(plan.drop_for, Some(Duration::from_secs(5)));
        assert_eq!(plan.storm, 0.1);
        assert!(toml::from_str::<FaultPlan>("dorp = 1").is_err());
    }
}
