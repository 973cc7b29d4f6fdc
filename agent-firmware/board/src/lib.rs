//! # caas-firmware-board: the thin board layer of the CaaS agent firmware
//!
//! The firmware (`agent-firmware/`, a `#![no_main]` Cortex-M4 binary) runs the agent core
//! unchanged; what it adds is this layer, kept in its own `no_std` library so that it also
//! builds and is tested on the host:
//!
//! - [`lines`]: the feature lines, one `embedded-hal` [`OutputPin`](embedded_hal::digital::OutputPin)
//!   per optional feature, and the recording pin the QEMU board uses;
//! - [`store`]: the persisted state in NOR flash through `embedded-storage`, in two A/B
//!   slots with a generation number, CRC and commit word, so a power cut at any write point
//!   leaves the old or the new state (`tests/power_cut.rs` cuts power > 10,000 times);
//! - [`transport`]: the seam to the telematics modem (a UART on hardware), and the byte
//!   format of the QEMU scenario files that stand in for it.
#![no_std]
#![forbid(unsafe_code)]

mod crc;
pub mod lines;
pub mod store;
pub mod transport;
