//! # caas-sim: the fleet simulator, scenarios, demo and benchmark table
//!
//! QA's tool and a new user's first contact with the system. It runs thousands of virtual
//! cars, each one a real MQTT connection (rumqttc) driving the **real agent core**
//! (`caas_agent::Agent`, unchanged, with its record kept in memory instead of sled), against a
//! real gateway; it drives the gateway's IoT API the way the CaaS core would, receives and
//! verifies the webhook callbacks, and measures.
//!
//! | module | what it does |
//! |---|---|
//! | [`car`] | one virtual car: the agent core over its own MQTT connection, with fault injection |
//! | [`fleet`] | provisions N cars (keys, `POST /vehicles`), connects them at a bounded rate, reports |
//! | [`faults`] | which cars misbehave, and how (offline at start, drops, refusals, delay, storms, corruption) |
//! | [`stats`] | counters and HDR histograms, the final report (text and JSON) |
//! | [`api`] | a small IoT API client |
//! | [`webhook`] | the callback receiver: HMAC check, one record per request, POST-to-callback latency |
//! | [`scenario`] | `caas-sim run`: activations at a target rate, or a campaign, from flags or TOML |
//! | [`gateway_proc`] | starting a real `caas-gateway` (and Mosquitto) as child processes |
//! | [`demo`] | `caas-sim demo`: the whole system's story in one command |
//! | [`bench`] | `caas-sim bench`: embedded broker vs Mosquitto, a markdown table |
//!
//! Everything here is I/O around the sans-IO core: the simulator moves bytes and time, the
//! core decides.

pub mod api;
pub mod bench;
pub mod car;
pub mod cli;
pub mod demo;
pub mod faults;
pub mod fleet;
pub mod floor;
pub mod gateway_proc;
pub mod scenario;
pub mod stats;
pub mod webhook;

/// Unix seconds now (UTC), as the agent core and the protocol count time.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Parses a duration such as `500ms`, `2s`, `3m`, `1h` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let t = text.trim();
    let (num, unit) = match t.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (e.g. 500ms, 2s, 3m)"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" | "" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("`{text}`: unknown unit `{unit}` (ms, s, m, h)")),
    };
    if !secs.is_finite() || !(0.0..=1.0e7).contains(&secs) {
        return Err(format!("`{text}` is out of range"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// Parses a ratio: `0.3` or `30%`, between 0 and 1.
pub fn parse_ratio(text: &str) -> Result<f64, String> {
    let t = text.trim();
    let value = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|v| v / 100.0),
        None => t.parse::<f64>(),
    }
    .map_err(|_| format!("`{text}` is not a ratio (0.3 or 30%)"))?;
    if !(0.0..=1.0).contains(&value) {
        return Err(format!("`{text}` is not between 0 and 1"));
    }
    Ok(value)
}

/// Resident memory of this process in bytes (Linux `/proc/self/status`), 0 if unknown.
pub fn rss_bytes() -> u64 {
    rss_of("self")
}

/// Resident memory of process `pid` (or `self`) in bytes, 0 if unknown.
pub fn rss_of(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Clock ticks per second of `/proc/PID/stat`'s times: Linux's `USER_HZ`, 100 on every
/// architecture it runs on (the kernel converts to it for user space).
const USER_HZ: f64 = 100.0;

/// CPU seconds (user + system) process `pid` (or `self`) has used so far, from
/// `/proc/PID/stat`; `None` if it cannot be read (not Linux, the process is gone).
pub fn cpu_secs_of(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// CPU seconds used so far by process `pid` and every process below it (worker processes).
pub fn cpu_secs_of_tree(pid: u32) -> Option<f64> {
    let own = cpu_secs_of(&pid.to_string())?;
    let children: f64 = child_pids(pid)
        .into_iter()
        .filter_map(cpu_secs_of_tree)
        .sum();
    Some(own + children)
}

fn child_pids(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// Installs rustls' ring provider once (reqwest and rumqttc need a process-wide provider).
pub fn init_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_ratios_parse_or_explain() {
        assert_eq!(
            parse_duration("500ms").unwrap(),
            std::time::Duration::from_millis(500)
        );
        assert_eq!(
            parse_duration("2").unwrap(),
            std::time::Duration::from_secs(2)
        );
        assert_eq!(
            parse_duration("3m").unwrap(),
            std::time::Duration::from_secs(180)
        );
        assert!(parse_duration("3 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
        assert_eq!(parse_ratio("30%").unwrap(), 0.3);
        assert_eq!(parse_ratio("0.25").unwrap(), 0.25);
        assert!(parse_ratio("1.5").is_err());
        assert!(parse_ratio("x").is_err());
    }

    #[test]
    fn cpu_time_is_read_and_only_grows() {
        let before = cpu_secs_of("self").unwrap();
        let mut x = 0u64;
        for i in 0..50_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        std::hint::black_box(x);
        let after = cpu_secs_of_tree(std::process::id()).unwrap();
        assert!(after >= before, "{before} then {after}");
        assert!(cpu_secs_of("0").is_none());
    }
}
