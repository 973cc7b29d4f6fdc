//! # caas-sim: the fleet simulator
//!
//! Will run thousands of virtual cars (each a real MQTT connection running the real agent
//! core), drive scenarios against the IoT API, run the demo and print the benchmark table.
fn main() {
    eprintln!("caas-sim: not built yet");
    std::process::exit(2);
}
