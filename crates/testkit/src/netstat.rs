//! Counters of the calling thread's network namespace, as `nstat` shows them, for tests
//! and benches that need to say *why* traffic did not arrive.
//!
//! Network namespaces belong to threads ([`crate::netns`]), so everything is read from
//! `/proc/thread-self/net/`: `netstat` and `snmp` (named `TcpExt.TCPLossProbes`,
//! `Tcp.RetransSegs`, ...) and `dev` (named `lo.rx_dropped`, ...). A packet the loopback
//! device could not queue for its receive softirq (the per-CPU backlog holds at most
//! `net.core.netdev_max_backlog` packets, a host-wide setting) counts in
//! `lo.rx_dropped`; to TCP it is an ordinary loss.

use std::collections::BTreeMap;
use std::io;

use crate::netns::context;

/// A snapshot of the namespace's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters(BTreeMap<String, i64>);

/// The `dev` columns after the interface name, in the kernel's order.
const DEV_COLUMNS: [&str; 16] = [
    "rx_bytes",
    "rx_packets",
    "rx_errors",
    "rx_dropped",
    "rx_fifo",
    "rx_frame",
    "rx_compressed",
    "rx_multicast",
    "tx_bytes",
    "tx_packets",
    "tx_errors",
    "tx_dropped",
    "tx_fifo",
    "tx_colls",
    "tx_carrier",
    "tx_compressed",
];

impl Counters {
    /// Read the counters of the calling thread's network namespace.
    pub fn read() -> io::Result<Self> {
        let mut map = BTreeMap::new();
        for file in ["netstat", "snmp"] {
            let path = format!("/proc/thread-self/net/{file}");
            let text = std::fs::read_to_string(&path).map_err(|e| context(e, &path))?;
            parse_pairs(&text, &mut map);
        }
        let path = "/proc/thread-self/net/dev";
        let text = std::fs::read_to_string(path).map_err(|e| context(e, path))?;
        parse_dev(&text, &mut map);
        Ok(Counters(map))
    }

    /// The value of `name` (`0` if this kernel does not have it).
    pub fn get(&self, name: &str) -> i64 {
        self.0.get(name).copied().unwrap_or(0)
    }

    /// How much every counter grew since `earlier`.
    pub fn since(&self, earlier: &Counters) -> Counters {
        Counters(
            self.0
                .iter()
                .map(|(k, v)| (k.clone(), v - earlier.get(k)))
                .collect(),
        )
    }

    /// `name value` for each of `names` that is not zero, for messages.
    pub fn show(&self, names: &[&str]) -> String {
        let parts: Vec<String> = names
            .iter()
            .filter(|n| self.get(n) != 0)
            .map(|n| format!("{n} {}", self.get(n)))
            .collect();
        if parts.is_empty() {
            "all zero".to_string()
        } else {
            parts.join(", ")
        }
    }
}

/// `netstat`/`snmp` format: pairs of lines `Group: Name1 Name2 ...` / `Group: v1 v2 ...`.
fn parse_pairs(text: &str, map: &mut BTreeMap<String, i64>) {
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.chunks(2) {
        let [names, values] = pair else { continue };
        let mut names = names.split_whitespace();
        let mut values = values.split_whitespace();
        let (Some(group), Some(group_again)) = (names.next(), values.next()) else {
            continue;
        };
        if group != group_again {
            continue;
        }
        let group = group.trim_end_matches(':');
        for (name, value) in names.zip(values) {
            if let Ok(v) = value.parse::<i64>() {
                map.insert(format!("{group}.{name}"), v);
            }
        }
    }
}

/// `dev` format: two header lines, then `  name: c1 c2 ...` per interface.
fn parse_dev(text: &str, map: &mut BTreeMap<String, i64>) {
    for line in text.lines().skip(2) {
        let Some((name, values)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        for (column, value) in DEV_COLUMNS.iter().zip(values.split_whitespace()) {
            if let Ok(v) = value.parse::<i64>() {
                map.insert(format!("{name}.{column}"), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_proc_formats() {
        let mut map = BTreeMap::new();
        parse_pairs(
            "TcpExt: SyncookiesSent TCPLossProbes\nTcpExt: 0 17\n\
             Tcp: RtoAlgorithm MaxConn RetransSegs\nTcp: 1 -1 5\n",
            &mut map,
        );
        parse_dev(
            "Inter-|   Receive |  Transmit\n face |bytes packets\n\
             \x20   lo: 100 2 0 7 0 0 0 0 100 2 0 0 0 0 0 0\n",
            &mut map,
        );
        let c = Counters(map);
        assert_eq!(c.get("TcpExt.TCPLossProbes"), 17);
        assert_eq!(c.get("Tcp.MaxConn"), -1);
        assert_eq!(c.get("Tcp.RetransSegs"), 5);
        assert_eq!(c.get("lo.rx_dropped"), 7);
        assert_eq!(c.get("lo.tx_packets"), 2);
        assert_eq!(c.get("Nope.Nothing"), 0);
        let later = Counters([("Tcp.RetransSegs".to_string(), 9)].into_iter().collect());
        let d = later.since(&c);
        assert_eq!(d.get("Tcp.RetransSegs"), 4);
        assert_eq!(
            d.show(&["Tcp.RetransSegs", "lo.rx_dropped"]),
            "Tcp.RetransSegs 4"
        );
    }

    #[test]
    fn reads_a_fresh_namespace() {
        crate::netns::enter_private_netns().expect("private netns (run the tests as root)");
        let c = Counters::read().expect("read");
        assert_eq!(c.get("lo.rx_dropped"), 0);
        assert_eq!(c.get("Tcp.ActiveOpens"), 0);
        let (_a, _b) = crate::tcp::pair("127.0.0.1".parse().expect("ip")).expect("pair");
        let d = Counters::read().expect("read").since(&c);
        assert_eq!(d.get("Tcp.ActiveOpens"), 1);
        assert_eq!(d.get("Tcp.PassiveOpens"), 1);
    }
}
