//! MQTT topic names, QoS and retain flags.
//!
//! Every car's topics live under `/tenants/{VIN}/`, the prefix rumqttd's
//! `validate-tenant-prefix` enforces from the Organization (O = VIN) of the car's client
//! certificate, and the pattern Mosquitto's ACL (`pattern readwrite /tenants/%u/#`, with the
//! certificate's CN = VIN as user name) enforces there. A car can reach only its own subtree.
//!
//! | topic | direction | QoS | retain |
//! |---|---|---|---|
//! | `/tenants/{VIN}/cmd` | gateway → car | 1 | yes for `SetState` (the latest desired state waits for the car), no for `QueryStatus` |
//! | `/tenants/{VIN}/report` | car → gateway | 1 | no |
//! | `/tenants/{VIN}/presence` | car → gateway | 1 | yes (`online`, and `offline` as the last will) |

use core::fmt::Write;

use crate::vin::Vin;

/// The bytes a car publishes on its presence topic when it connects.
pub const PRESENCE_ONLINE: &[u8] = b"online";
/// The bytes of a car's last will on its presence topic.
pub const PRESENCE_OFFLINE: &[u8] = b"offline";

/// MQTT quality of service level for commands: at least once (the agent deduplicates by seq).
pub const COMMAND_QOS: u8 = 1;
/// QoS for reports: at least once (the gateway deduplicates by seq).
pub const REPORT_QOS: u8 = 1;
/// QoS for presence.
pub const PRESENCE_QOS: u8 = 1;
/// `SetState` commands are retained so a car that connects later finds its desired state.
pub const COMMAND_RETAIN: bool = true;
/// `QueryStatus` commands are not retained: they must not displace the retained `SetState`.
pub const QUERY_RETAIN: bool = false;
/// Reports are not retained.
pub const REPORT_RETAIN: bool = false;
/// Presence is retained so the gateway learns connectivity after its own restart.
pub const PRESENCE_RETAIN: bool = true;

/// The two topics of the bench's bare MQTT round trips (`caas-sim bench`, its floor row: one
/// client publishes on the first, another echoes on the second), outside every car's
/// subtree. The embedded broker keeps a burst on these two, as it does for the fleet-wide
/// filters, instead of only the newest message as on a car's own topics: a bare round trip
/// must not be lost to that. Fixed names, so that the larger log is for two filters only.
pub const BENCH_TOPICS: [&str; 2] = ["caas-bench/ping", "caas-bench/pong"];

/// Longest topic name this module produces.
pub const MAX_TOPIC_LEN: usize = 64;

/// A topic name, bounded by [`MAX_TOPIC_LEN`].
pub type Topic = heapless::String<MAX_TOPIC_LEN>;

fn topic(vin: &Vin, leaf: &str) -> Topic {
    let mut t = Topic::new();
    // "/tenants/" (9) + VIN (17) + "/" + leaf (at most 8) fits in 64.
    let _ = write!(t, "/tenants/{vin}/{leaf}");
    t
}

/// Where the gateway publishes a car's commands; the car subscribes here.
pub fn command_topic(vin: &Vin) -> Topic {
    topic(vin, "cmd")
}

/// Where a car publishes its signed reports.
pub fn report_topic(vin: &Vin) -> Topic {
    topic(vin, "report")
}

/// Where a car publishes `online`, and its last will `offline`.
pub fn presence_topic(vin: &Vin) -> Topic {
    topic(vin, "presence")
}

/// The gateway's subscription to every car's reports.
pub const ALL_REPORTS: &str = "/tenants/+/report";
/// The gateway's subscription to every car's presence.
pub const ALL_PRESENCE: &str = "/tenants/+/presence";

/// What a topic under `/tenants/` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind {
    /// A command topic.
    Command,
    /// A report topic.
    Report,
    /// A presence topic.
    Presence,
}

/// Splits a car topic into its VIN and kind; `None` for anything else.
pub fn parse_topic(topic: &str) -> Option<(Vin, TopicKind)> {
    let rest = topic.strip_prefix("/tenants/")?;
    let (vin, leaf) = rest.split_once('/')?;
    let vin: Vin = vin.parse().ok()?;
    let kind = match leaf {
        "cmd" => TopicKind::Command,
        "report" => TopicKind::Report,
        "presence" => TopicKind::Presence,
        _ => return None,
    };
    Some((vin, kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_are_per_car_and_parse_back() {
        let vin: Vin = "WVWZZZ1JZXW000001".parse().unwrap();
        assert_eq!(
            command_topic(&vin).as_str(),
            "/tenants/WVWZZZ1JZXW000001/cmd"
        );
        assert_eq!(
            report_topic(&vin).as_str(),
            "/tenants/WVWZZZ1JZXW000001/report"
        );
        assert_eq!(
            presence_topic(&vin).as_str(),
            "/tenants/WVWZZZ1JZXW000001/presence"
        );
        assert_eq!(
            parse_topic(&report_topic(&vin)),
            Some((vin, TopicKind::Report))
        );
        assert_eq!(
            parse_topic(&presence_topic(&vin)),
            Some((vin, TopicKind::Presence))
        );
        assert_eq!(parse_topic("/tenants/WVWZZZ1JZXW000001/other"), None);
        assert_eq!(parse_topic("/tenants/BAD/report"), None);
        assert_eq!(parse_topic("tenants/WVWZZZ1JZXW000001/report"), None);
    }
}
