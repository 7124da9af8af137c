//! Identifiers that can only hold valid values: workspaces, clients, services.

use std::fmt;

/// A random lower-case alphanumeric string, for ids, keys and sessions.
pub fn random_id(len: usize) -> String {
    use rand::RngExt;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// An identifier that failed validation, with the reason in words.
#[derive(Debug, thiserror::Error)]
#[error("invalid {kind} {value:?}: {reason}")]
pub struct InvalidId {
    kind: &'static str,
    value: String,
    reason: &'static str,
}

fn check(kind: &'static str, value: &str, max: usize) -> Result<(), InvalidId> {
    let fail = |reason| {
        Err(InvalidId {
            kind,
            value: value.chars().take(80).collect(),
            reason,
        })
    };
    if value.is_empty() {
        return fail("must not be empty");
    }
    if value.len() > max {
        return fail("is too long");
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '|'))
    {
        return fail("may only contain letters, digits, '-', '_', '.' and '|'");
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $max:expr) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Parses a value, refusing anything that is not a valid identifier.
            pub fn parse(value: impl Into<String>) -> Result<Self, InvalidId> {
                let value = value.into();
                check($kind, &value, $max)?;
                Ok(Self(value))
            }

            /// The identifier as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        // Ordering and hashing are those of the text, so maps keyed by the id can be looked
        // up with a `&str`.
        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    /// A workspace name such as `ws-user-alice` or `public`.
    WorkspaceId,
    "workspace",
    128
);
id_type!(
    /// A client id, unique within its workspace.
    ClientId,
    "client id",
    128
);
id_type!(
    /// A user id (a token's `sub`), such as `github|123` or `anonymouz-abc`; short enough that
    /// the user's own workspace `ws-user-<id>` is a valid workspace id too.
    UserId,
    "user id",
    120
);
id_type!(
    /// The short name of a service within its client, such as `default` or `hypha-login`.
    ServiceName,
    "service name",
    128
);

/// The address of a connected client: `{workspace}/{client_id}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerAddr {
    pub workspace: WorkspaceId,
    pub client: ClientId,
}

impl PeerAddr {
    pub(crate) fn new(workspace: WorkspaceId, client: ClientId) -> Self {
        Self { workspace, client }
    }

    /// The address of `client` in `workspace`, both checked; `None` when either is invalid.
    pub(crate) fn from_parts(workspace: &str, client: &str) -> Option<Self> {
        Some(Self::new(
            WorkspaceId::parse(workspace).ok()?,
            ClientId::parse(client).ok()?,
        ))
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.workspace, self.client)
    }
}

/// A peer address as it travels in frames and maps (`workspace/client` text), read in place:
/// the one place that splits it, so nothing splits addresses by hand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PeerRef<'a> {
    pub workspace: &'a str,
    pub client: &'a str,
}

impl<'a> PeerRef<'a> {
    /// Splits `workspace/client`; `None` without a `/`.
    pub(crate) fn split(addr: &'a str) -> Option<Self> {
        addr.split_once('/')
            .map(|(workspace, client)| PeerRef { workspace, client })
    }

    /// The client part of an address (the whole text when it names no workspace).
    pub(crate) fn client_of(addr: &'a str) -> &'a str {
        Self::split(addr).map_or(addr, |peer| peer.client)
    }
}

/// A full service id: `{workspace}/{client_id}:{service}[@{app_id}]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceId {
    pub provider: PeerAddr,
    pub name: ServiceName,
    pub app: Option<String>,
}

impl ServiceId {
    /// Parses an absolute service id.
    pub(crate) fn parse(value: &str) -> Result<Self, InvalidId> {
        let bad = |reason| InvalidId {
            kind: "service id",
            value: value.chars().take(80).collect(),
            reason,
        };
        let (provider, service) = value
            .split_once(':')
            .ok_or_else(|| bad("must look like workspace/client:service"))?;
        let (ws, client) = provider
            .split_once('/')
            .ok_or_else(|| bad("must look like workspace/client:service"))?;
        let (name, app) = match service.split_once('@') {
            Some((n, a)) => (n, Some(a.to_string())),
            None => (service, None),
        };
        Ok(Self {
            provider: PeerAddr::new(WorkspaceId::parse(ws)?, ClientId::parse(client)?),
            name: ServiceName::parse(name)?,
            app: app.filter(|a| !a.is_empty() && a != "*"),
        })
    }
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.provider, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_refuse_separators() {
        assert!(WorkspaceId::parse("ws-user-a").is_ok());
        assert!(WorkspaceId::parse("a/b").is_err());
        // `*/...` senders are managers': instances trust such a `from` (see
        // `workspace::inbound`), so no client may have that workspace.
        assert!(WorkspaceId::parse("*").is_err());
        assert!(ClientId::parse("").is_err());
        assert!(ClientId::parse("x".repeat(200)).is_err());
        assert!(ServiceName::parse("svc:x").is_err());
    }

    #[test]
    fn service_id_round_trip() {
        let id = ServiceId::parse("ws-a/c1:echo@app1").unwrap();
        assert_eq!(id.to_string(), "ws-a/c1:echo");
        assert_eq!(id.app.as_deref(), Some("app1"));
        assert!(ServiceId::parse("nows:svc").is_err());
    }
}
