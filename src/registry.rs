//! The service registry: who provides what, under which visibility, and how queries resolve.

use std::collections::BTreeMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

use rmpv::Value;

use crate::auth::UserInfo;
use crate::auth::workspaces::WorkspaceBook;
use crate::error::Error;
use crate::ids::ServiceId;
use crate::rpc::value::{get, get_str};

/// Who may see and use a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visibility {
    Public,
    Protected,
    Unlisted,
}

impl Visibility {
    /// `public`, `protected` (the default) or `unlisted`.
    pub(crate) fn parse(text: Option<&str>) -> Result<Self, Error> {
        match text.unwrap_or("protected") {
            "public" => Ok(Visibility::Public),
            "protected" => Ok(Visibility::Protected),
            "unlisted" => Ok(Visibility::Unlisted),
            other => Err(Error::BadRequest(format!(
                "visibility must be public, protected or unlisted, not {other:?}"
            ))),
        }
    }
}

/// A registered service.
#[derive(Debug, Clone)]
pub struct ServiceEntry {
    pub id: ServiceId,
    /// The service info as registered, with `id` made absolute.
    pub info: std::sync::Arc<Value>,
    pub visibility: Visibility,
    pub authorized_workspaces: Vec<String>,
    pub service_type: String,
    seq: u64,
}

impl ServiceEntry {
    /// The service info, taken out (copied only if another holder shares it).
    pub(crate) fn into_info(self) -> Value {
        std::sync::Arc::unwrap_or_clone(self.info)
    }

    /// Builds an entry from a `register_service` info dict.
    pub(crate) fn from_info(id: ServiceId, mut info: Value) -> Result<Self, Error> {
        let config = get(&info, "config");
        let visibility = Visibility::parse(config.and_then(|c| get_str(c, "visibility")))?;
        let authorized_workspaces = config
            .and_then(|c| get(c, "authorized_workspaces"))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let service_type = get_str(&info, "type").unwrap_or("generic").to_string();
        crate::rpc::value::set(&mut info, "id", id.to_string().into());
        Ok(Self {
            id,
            info: std::sync::Arc::new(info),
            visibility,
            authorized_workspaces,
            service_type,
            seq: 0,
        })
    }

    /// Whether `user`, calling from `workspace`, may use this service.
    pub(crate) fn allows(&self, workspace: &str, user: &UserInfo, book: &WorkspaceBook) -> bool {
        let home = self.id.provider.workspace.as_str();
        self.visibility != Visibility::Protected
            || workspace == home
            || self.authorized_workspaces.iter().any(|w| w == workspace)
            || book.permission(user, home).is_some()
    }

    /// The registry key: the full id with its app (`ws/client:name@app`).
    pub(crate) fn key(&self) -> String {
        key(&self.id)
    }

    /// When it was registered (microseconds since the epoch, unique per instance).
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    /// The entry with a registration stamp read back from the shared registry.
    pub(crate) fn with_seq(mut self, seq: u64) -> Self {
        self.seq = seq;
        self
    }
}

fn key(id: &ServiceId) -> String {
    format!("{}@{}", id, id.app.as_deref().unwrap_or("*"))
}

/// A parsed `get_service` query: `svc`, `ws/svc`, `ws/client:svc`, `client:svc`, with `@app`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ServiceQuery {
    pub workspace: String,
    /// `None` matches any client.
    pub client: Option<String>,
    pub name: String,
    pub app: Option<String>,
}

impl ServiceQuery {
    pub(crate) fn parse(query: &str, caller_ws: &str) -> Result<Self, Error> {
        let bad = || Error::BadRequest(format!("invalid service query {query:?}"));
        if query.is_empty() || query.len() > 512 {
            return Err(bad());
        }
        let (left, service) = match query.split_once(':') {
            Some((l, s)) => (Some(l), s),
            None => (None, query),
        };
        let (service, app) = match service.split_once('@') {
            Some((s, a)) => (s, Some(a.to_string()).filter(|a| !a.is_empty() && a != "*")),
            None => (service, None),
        };
        let (workspace, client, name) = match left {
            Some(left) => match crate::ids::PeerRef::split(left) {
                Some(peer) => (peer.workspace, Some(peer.client), service),
                None => (caller_ws, Some(left), service),
            },
            None => match service.split_once('/') {
                Some((ws, name)) => (ws, None, name),
                None => (caller_ws, None, service),
            },
        };
        if name.is_empty() || name.contains('/') || workspace.is_empty() {
            return Err(bad());
        }
        let workspace = if workspace == "*" {
            caller_ws
        } else {
            workspace
        };
        Ok(Self {
            workspace: workspace.to_string(),
            client: client.filter(|c| *c != "*").map(str::to_string),
            name: name.to_string(),
            app,
        })
    }

    /// Whether a service of the query's workspace answers it.
    pub(crate) fn matches(&self, entry: &ServiceEntry) -> bool {
        entry.id.name.as_str() == self.name
            && self
                .client
                .as_deref()
                .is_none_or(|c| entry.id.provider.client.as_str() == c)
            && self
                .app
                .as_deref()
                .is_none_or(|a| entry.id.app.as_deref() == Some(a))
    }
}

/// All registered services, ordered by key so one client's services are contiguous.
#[derive(Default)]
pub struct Registry {
    services: RwLock<BTreeMap<String, ServiceEntry>>,
    seq: AtomicU64,
}

impl Registry {
    /// Gives an entry its registration stamp: the time in microseconds, so that entries of
    /// several instances sort by registration, and never twice the same on one instance.
    pub(crate) fn stamp(&self, mut entry: ServiceEntry) -> ServiceEntry {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let previous = self
            .seq
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
                Some(now.max(last + 1))
            })
            .unwrap_or(0);
        entry.seq = now.max(previous + 1);
        entry
    }

    /// Adds or replaces a service (stamping it if [`Registry::stamp`] was not called).
    pub(crate) fn insert(&self, entry: ServiceEntry) {
        let entry = if entry.seq == 0 {
            self.stamp(entry)
        } else {
            entry
        };
        if let Ok(mut services) = self.services.write() {
            services.insert(entry.key(), entry);
        }
    }

    /// Removes services matching a full id (any app id); returns what was removed.
    pub(crate) fn remove(&self, id: &ServiceId) -> Vec<ServiceEntry> {
        let prefix = format!("{id}@");
        self.remove_prefix(&prefix)
    }

    /// Removes every service of a client (`ws/cid`).
    pub(crate) fn remove_client(&self, addr: &str) -> Vec<ServiceEntry> {
        self.remove_prefix(&format!("{addr}:"))
    }

    fn remove_prefix(&self, prefix: &str) -> Vec<ServiceEntry> {
        let Ok(mut services) = self.services.write() else {
            return Vec::new();
        };
        let keys: Vec<String> = services
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect();
        keys.iter().filter_map(|k| services.remove(k)).collect()
    }

    /// Services in a workspace that `keep` accepts, in registration order (only those are
    /// copied out).
    pub(crate) fn in_workspace_where(
        &self,
        workspace: &str,
        keep: impl Fn(&ServiceEntry) -> bool,
    ) -> Vec<ServiceEntry> {
        let prefix = format!("{workspace}/");
        let Ok(services) = self.services.read() else {
            return Vec::new();
        };
        let mut found: Vec<ServiceEntry> = services
            .range::<str, _>((
                std::ops::Bound::Included(prefix.as_str()),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(_, e)| keep(e))
            .map(|(_, e)| e.clone())
            .collect();
        found.sort_by_key(|e| e.seq);
        found
    }

    /// Services matching a query, in registration order.
    #[cfg(test)]
    pub(crate) fn find(&self, query: &ServiceQuery) -> Vec<ServiceEntry> {
        self.in_workspace_where(&query.workspace, |e| query.matches(e))
    }

    /// Every entry (for writing this instance's state back to the shared registry).
    pub(crate) fn all(&self) -> Vec<ServiceEntry> {
        self.services
            .read()
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Services a client (`ws/cid`) has registered.
    pub(crate) fn count_of(&self, addr: &str) -> usize {
        let prefix = format!("{addr}:");
        self.services
            .read()
            .map(|s| {
                s.range(prefix.clone()..)
                    .take_while(|(k, _)| k.starts_with(&prefix))
                    .count()
            })
            .unwrap_or(0)
    }

    pub(crate) fn len(&self) -> usize {
        self.services.read().map(|s| s.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::value::obj;

    fn entry(id: &str, visibility: &str) -> ServiceEntry {
        let info = obj([
            ("id", id.into()),
            ("config", obj([("visibility", visibility.into())])),
        ]);
        ServiceEntry::from_info(ServiceId::parse(id).unwrap(), info).unwrap()
    }

    #[test]
    fn query_forms() {
        let q = ServiceQuery::parse("echo", "ws1").unwrap();
        assert_eq!(
            (q.workspace.as_str(), q.client.as_deref(), q.name.as_str()),
            ("ws1", None, "echo")
        );
        let q = ServiceQuery::parse("ws2/echo", "ws1").unwrap();
        assert_eq!((q.workspace.as_str(), q.client.as_deref()), ("ws2", None));
        let q = ServiceQuery::parse("ws2/c1:echo@app", "ws1").unwrap();
        assert_eq!(
            (q.client.as_deref(), q.app.as_deref()),
            (Some("c1"), Some("app"))
        );
        let q = ServiceQuery::parse("c1:echo", "ws1").unwrap();
        assert_eq!(
            (q.workspace.as_str(), q.client.as_deref()),
            ("ws1", Some("c1"))
        );
        assert!(ServiceQuery::parse("", "ws1").is_err());
    }

    #[test]
    fn find_and_remove_by_client() {
        let registry = Registry::default();
        registry.insert(entry("ws1/c1:echo", "public"));
        registry.insert(entry("ws1/c2:echo", "protected"));
        registry.insert(entry("ws1/c10:other", "protected"));
        let q = ServiceQuery::parse("echo", "ws1").unwrap();
        assert_eq!(registry.find(&q).len(), 2);
        assert_eq!(registry.remove_client("ws1/c1").len(), 1);
        assert_eq!(registry.find(&q).len(), 1);
        assert_eq!(registry.len(), 2);
        let outsider = UserInfo::new(crate::ids::UserId::parse("x").unwrap(), vec![], None);
        assert!(!registry.find(&q)[0].allows("ws9", &outsider, &WorkspaceBook::default()));
        assert!(registry.find(&q)[0].allows("ws1", &outsider, &WorkspaceBook::default()));
    }
}
