//! Which addresses the demo's media sockets use when `--rtc-ip` is not given: the one address
//! the server listens on, or, when it listens on every address (0.0.0.0 or ::), this
//! machine's interface addresses. Loopback comes last: Chromium accepts it, Firefox is reported
//! to refuse loopback candidates, and a remote browser cannot reach it.

use std::net::{IpAddr, Ipv4Addr, ToSocketAddrs};

/// Most addresses advertised automatically; a host with many bridges gets the first ones.
const MAX_AUTOMATIC: usize = 8;

/// The addresses for a server listening on `host`.
pub(crate) fn automatic(host: &str) -> Vec<IpAddr> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match host.parse::<IpAddr>() {
        Ok(ip) if ip.is_unspecified() => {
            let interfaces = if_addrs::get_if_addrs()
                .map(|list| {
                    list.into_iter()
                        .filter(|i| i.is_oper_up() || i.is_loopback())
                        .map(|i| i.ip())
                        .collect()
                })
                .unwrap_or_default();
            choose(interfaces, ip.is_ipv6())
        }
        Ok(ip) => vec![ip],
        // A name: what it resolves to, as the listener did.
        Err(_) => (host, 0)
            .to_socket_addrs()
            .map(|addrs| addrs.map(|a| a.ip()).take(MAX_AUTOMATIC).collect())
            .ok()
            .filter(|ips: &Vec<IpAddr>| !ips.is_empty())
            .unwrap_or_else(|| vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]),
    }
}

/// Orders interface addresses for advertising: usable ones first, loopback last. IPv6 only for
/// a server listening on `::`; link-local IPv6 never (it needs a scope a candidate cannot carry).
fn choose(interfaces: Vec<IpAddr>, with_ipv6: bool) -> Vec<IpAddr> {
    let usable = |ip: &IpAddr| match ip {
        IpAddr::V4(v4) => !v4.is_unspecified() && !v4.is_link_local(),
        IpAddr::V6(v6) => {
            with_ipv6 && !v6.is_unspecified() && (v6.segments()[0] & 0xffc0) != 0xfe80
        }
    };
    let mut chosen: Vec<IpAddr> = Vec::new();
    for loopback in [false, true] {
        for ip in interfaces.iter().filter(|ip| usable(ip)) {
            if ip.is_loopback() == loopback && !chosen.contains(ip) {
                chosen.push(*ip);
            }
        }
    }
    chosen.truncate(MAX_AUTOMATIC);
    if chosen.is_empty() {
        chosen.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn interfaces_are_ordered_and_filtered() {
        let found = ips(&[
            "127.0.0.1",
            "192.0.2.10",
            "::1",
            "fe80::1",
            "2001:db8::5",
            "169.254.1.1",
        ]);
        assert_eq!(
            choose(found.clone(), false),
            ips(&["192.0.2.10", "127.0.0.1"])
        );
        assert_eq!(
            choose(found, true),
            ips(&["192.0.2.10", "2001:db8::5", "127.0.0.1", "::1"])
        );
        assert_eq!(choose(vec![], false), ips(&["127.0.0.1"]));
        let many: Vec<IpAddr> = (1..=20).map(|i| IpAddr::from([192, 0, 2, i])).collect();
        assert_eq!(choose(many, false).len(), MAX_AUTOMATIC);
    }

    #[test]
    fn one_listening_address_is_used_as_it_is() {
        assert_eq!(automatic("127.0.0.2"), ips(&["127.0.0.2"]));
        assert_eq!(automatic("[::1]"), ips(&["::1"]));
        assert!(automatic("localhost").iter().all(IpAddr::is_loopback));
        // This machine has at least loopback.
        assert!(automatic("0.0.0.0").contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)));
    }
}
