//! ICE server lists: coturn addresses (`host:port`, IPv6 as `[::1]:3478`) and the static
//! `--ice-server` entries in NVIDIA Holohub's syntax.

use std::fmt;

use rmpv::Value;

/// The default STUN/TURN port.
pub(crate) const DEFAULT_PORT: u16 = 3478;

/// A host and port, with IPv6 literals kept in brackets for URIs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl HostPort {
    /// Parses `host[:port]`, `[v6]:port` or a bare IPv6 literal; a `turn:`/`stun:` prefix is allowed.
    pub fn parse(text: &str) -> Result<Self, crate::options::InvalidValue> {
        let text = text.trim();
        let text = ["turn:", "turns:", "stun:", "stuns:"]
            .iter()
            .find_map(|p| text.strip_prefix(p))
            .unwrap_or(text);
        let bad = || {
            format!("{text:?} is not host:port (e.g. turn.example.org:3478 or [2001:db8::1]:3478)")
        };
        if text.is_empty() {
            return Err(bad().into());
        }
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let (host, after) = rest.split_once(']').ok_or_else(bad)?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(bad)?),
            };
            host.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
            (host.to_string(), port)
        } else if text.matches(':').count() > 1 {
            text.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
            (text.to_string(), None)
        } else {
            match text.split_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (text.to_string(), None),
            }
        };
        let port = match port {
            Some(p) => p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(bad)?,
            None => DEFAULT_PORT,
        };
        let valid_host = host.contains(':')
            || (!host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')));
        if !valid_host {
            return Err(bad().into());
        }
        Ok(Self { host, port })
    }

    /// `host:port` as it goes into a URI.
    pub(crate) fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.authority())
    }
}

/// A static ICE server from `--ice-server`.
#[derive(Clone, PartialEq, Eq)]
pub enum StaticIceServer {
    Stun(HostPort),
    Turn {
        address: HostPort,
        username: String,
        password: String,
    },
}

impl fmt::Debug for StaticIceServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StaticIceServer::Stun(a) => write!(f, "stun:{a}"),
            StaticIceServer::Turn {
                address, username, ..
            } => write!(f, "turn:{address}[{username}:***]"),
        }
    }
}

impl StaticIceServer {
    /// Parses `turn:<host>:<port>[<user>:<password>]` or `stun:<host>:<port>`. The password is
    /// everything after the first `:` inside the brackets, so it may itself contain `:`.
    pub(crate) fn parse(text: &str) -> Result<Self, crate::options::InvalidValue> {
        let expected = "expected turn:<host>:<port>[<user>:<password>] or stun:<host>:<port>";
        let text = text.trim();
        if let Some(rest) = text.strip_prefix("stun:") {
            return HostPort::parse(rest)
                .map(StaticIceServer::Stun)
                .map_err(|e| format!("{e}; {expected}").into());
        }
        let rest = text
            .strip_prefix("turn:")
            .ok_or_else(|| format!("{text:?}: {expected}"))?;
        let no_creds = || format!("{text:?} has no [<user>:<password>] after the port; {expected}");
        let body = rest.strip_suffix(']').ok_or_else(no_creds)?;
        // The credentials start at the first `[` that follows a complete `host:port`; an IPv6
        // host is bracketed too, and a password may contain `[`.
        let (address, creds) = rest
            .match_indices('[')
            .filter(|(i, _)| *i < body.len())
            .map(|(i, _)| (&rest[..i], &body[i + 1..]))
            .find(|(address, _)| {
                address
                    .rsplit_once(':')
                    .is_some_and(|(_, port)| port.parse::<u16>().is_ok())
                    && HostPort::parse(address).is_ok()
            })
            .ok_or_else(no_creds)?;
        let (username, password) = creds
            .split_once(':')
            .ok_or_else(|| format!("{text:?}: {expected}"))?;
        if username.is_empty() || password.is_empty() {
            return Err(
                format!("{text:?}: user and password must not be empty; {expected}").into(),
            );
        }
        Ok(StaticIceServer::Turn {
            address: HostPort::parse(address).map_err(|e| format!("{e}; {expected}"))?,
            username: username.to_string(),
            password: password.to_string(),
        })
    }

    /// The entry clients pass to `RTCPeerConnection`: only `urls`, `username`, `credential`
    /// (in the order of coturn's entries: `credential`, `urls`, `username`).
    pub(crate) fn to_value(&self) -> Value {
        match self {
            StaticIceServer::Stun(a) => Value::Map(vec![(
                "urls".into(),
                Value::Array(vec![format!("stun:{a}").into()]),
            )]),
            StaticIceServer::Turn {
                address,
                username,
                password,
            } => turn_entry(
                password,
                Value::Array(vec![
                    format!("turn:{address}").into(),
                    format!("turn:{address}?transport=tcp").into(),
                ]),
                username,
            ),
        }
    }
}

/// A TURN server's entry, coturn's and the static ones alike: `credential`, `urls` and
/// `username`, in that order.
pub(crate) fn turn_entry(credential: &str, urls: Value, username: &str) -> Value {
    Value::Map(vec![
        ("credential".into(), credential.into()),
        ("urls".into(), urls),
        ("username".into(), username.into()),
    ])
}

/// The URLs handed out for one coturn server, in Hypha's order and then the extras.
pub(crate) fn coturn_urls(address: &HostPort, tls_port: Option<u16>) -> Vec<String> {
    let mut urls = vec![
        format!("turn:{address}"),
        format!("stun:{address}"),
        format!("turn:{address}?transport=tcp"),
    ];
    if let Some(port) = tls_port {
        let tls = HostPort {
            host: address.host.clone(),
            port,
        };
        urls.push(format!("turns:{tls}?transport=tcp"));
    }
    urls
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ports() {
        assert_eq!(
            HostPort::parse("coturn:3479").unwrap().authority(),
            "coturn:3479"
        );
        assert_eq!(HostPort::parse("example.org").unwrap().port, 3478);
        assert_eq!(
            HostPort::parse("[::1]:5000").unwrap().authority(),
            "[::1]:5000"
        );
        assert_eq!(HostPort::parse("::1").unwrap().authority(), "[::1]:3478");
        assert_eq!(
            HostPort::parse("turn:1.2.3.4:9").unwrap().authority(),
            "1.2.3.4:9"
        );
        for bad in [
            "",
            "host:0",
            "host:99999",
            "[::1",
            "[nothost]:1",
            "a b:1",
            "host:port",
        ] {
            assert!(HostPort::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn coturn_urls_in_order_with_tls() {
        let a = HostPort::parse("[2001:db8::1]:3478").unwrap();
        assert_eq!(
            coturn_urls(&a, Some(5349)),
            vec![
                "turn:[2001:db8::1]:3478",
                "stun:[2001:db8::1]:3478",
                "turn:[2001:db8::1]:3478?transport=tcp",
                "turns:[2001:db8::1]:5349?transport=tcp",
            ]
        );
        assert_eq!(coturn_urls(&a, None).len(), 3);
    }

    #[test]
    fn holohub_syntax_with_colons_in_passwords() {
        let s = StaticIceServer::parse("turn:10.0.0.1:3478[alice:pa:ss:word]").unwrap();
        assert_eq!(
            s,
            StaticIceServer::Turn {
                address: HostPort::parse("10.0.0.1:3478").unwrap(),
                username: "alice".into(),
                password: "pa:ss:word".into()
            }
        );
        let v6 = StaticIceServer::parse("turn:[2001:db8::1]:3478[bob:x]").unwrap();
        assert!(
            matches!(v6, StaticIceServer::Turn { ref address, .. } if address.authority() == "[2001:db8::1]:3478")
        );
        assert_eq!(
            StaticIceServer::parse("stun:[::1]:19302")
                .unwrap()
                .to_value(),
            Value::Map(vec![(
                "urls".into(),
                Value::Array(vec!["stun:[::1]:19302".into()])
            )])
        );
        let turn = s.to_value();
        let keys: Vec<&str> = turn
            .as_map()
            .unwrap()
            .iter()
            .filter_map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(keys, ["credential", "urls", "username"]);
        assert!(!format!("{s:?}").contains("pa:ss"));
        for bad in [
            "turn:1.2.3.4:3478",
            "turn:1.2.3.4:3478[nopass]",
            "http://x",
            "turn:1.2.3.4[a:b]",
            "turn:h:1[:p]",
        ] {
            assert!(StaticIceServer::parse(bad).is_err(), "{bad}");
        }
    }
}
