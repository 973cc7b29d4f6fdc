//! # caas-agent: the agent that runs in each car
//!
//! Will hold the deterministic, sans-IO agent core (`no_std`): verify a command, persist,
//! apply, acknowledge, report; and, behind feature `std`, the Linux runtime (tokio, rumqttc,
//! sled) and the `caas-agent` binary. The firmware and the simulator run the same core.
#![cfg_attr(not(feature = "std"), no_std)]
