//! # caas-gateway: the fleet command gateway
//!
//! Will serve the IoT API over HTTP, keep a durable activation engine (sled, retries, support
//! tickets, webhooks), sign commands with the protocol crate and fan them out over MQTT
//! (embedded rumqttd or an external broker).
fn main() {
    eprintln!("caas-gateway: not built yet");
    std::process::exit(2);
}
