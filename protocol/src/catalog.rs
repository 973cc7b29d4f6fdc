//! The seed catalogue's feature flags: the default platform of the agent runtime, the
//! simulator's cars and the gateway's checks, kept here so no two parts disagree on a name.

/// Optional features of the seed catalogue: dormant in every car's firmware, switched on by
/// commands.
pub const SEED_OPTIONAL_FEATURES: &[&str] = &[
    "power_boost",
    "highway_autopilot",
    "parking_assist",
    "lane_keeping",
    "adaptive_cruise",
    "collision_avoidance",
    "snow_mode",
    "offroad_mode",
    "sport_mode",
    "advanced_hvac",
    "heated_seats",
    "seat_cooling",
    "premium_audio",
    "streaming",
];

/// Base-platform features of the seed catalogue: what every car was sold with; no command
/// may switch them on or off.
pub const SEED_BASE_FEATURES: &[&str] = &[
    "abs",
    "esc",
    "airbags",
    "headlights",
    "basic_audio",
    "climate",
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FeatureFlag;

    #[test]
    fn catalogue_names_are_valid_flags_and_disjoint() {
        for name in SEED_OPTIONAL_FEATURES.iter().chain(SEED_BASE_FEATURES) {
            assert!(FeatureFlag::new(name).is_ok(), "{name}");
        }
        assert!(SEED_OPTIONAL_FEATURES
            .iter()
            .all(|f| !SEED_BASE_FEATURES.contains(f)));
    }
}
