//! The shared half of the registry when several instances run (`--redis-uri`): which clients
//! and services exist on the other instances, kept in Redis.
//!
//! Every entry names its owning instance. Each instance holds a lease (a score in a sorted
//! set) and renews it every [`HEARTBEAT`]; entries of an instance whose lease ran out are
//! ignored at once and removed by the first instance that notices. An entry is only ever
//! removed while its owner is still the one named, so a client that re-registered on another
//! instance keeps its new entries. Each instance's own entries are also kept in its local
//! registry, which it writes back whenever Redis lost them (restart, expired lease).
//!
//! Keys (all under `hypha-rtc:`): `instances` (sorted set: instance -> lease end in ms),
//! `svc:<ws>` (hash: service key -> `owner\n` + msgpack `[seq, id, info]`), `cli:<ws>` (hash:
//! client -> owner), `own:<instance>` (set of `kind\nws\nfield`, what to remove when it dies),
//! `links` (hash: instance -> the address its instance link listens on, where it has one).

use std::collections::{HashMap, HashSet};
use std::sync::RwLock;
use std::time::Duration;

use redis::aio::ConnectionManager;
use rmpv::Value;

use super::redis::{COMMAND_TIMEOUT, PREFIX};
use crate::error::Error;
use crate::ids::ServiceId;
use crate::registry::ServiceEntry;

/// How long an instance's entries outlive its last heartbeat.
pub(crate) const LEASE: Duration = Duration::from_secs(15);
/// How often an instance renews its lease and looks for dead ones.
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(3);

/// Removes the members of an owner's set whose entries that owner still holds; returns
/// `kind, ws, field, value` for each entry removed. ARGV: prefix, owner, then the members to
/// check (none: all of them, and the set itself goes too).
const RELEASE_SCRIPT: &str = r#"
local prefix, owner = ARGV[1], ARGV[2]
local own = prefix .. 'own:' .. owner
local members = {}
if #ARGV > 2 then
  for i = 3, #ARGV do members[#members + 1] = ARGV[i] end
else
  members = redis.call('SMEMBERS', own)
end
local removed = {}
for _, m in ipairs(members) do
  local a = string.find(m, '\n', 1, true)
  local b = a and string.find(m, '\n', a + 1, true)
  if b then
    local kind, ws, field = string.sub(m, 1, a - 1), string.sub(m, a + 1, b - 1), string.sub(m, b + 1)
    local key, held
    if kind == 's' then key = prefix .. 'svc:' .. ws else key = prefix .. 'cli:' .. ws end
    local v = redis.call('HGET', key, field)
    if v then
      held = v == owner or string.sub(v, 1, #owner + 1) == owner .. '\n'
      if held then
        redis.call('HDEL', key, field)
        removed[#removed + 1] = kind
        removed[#removed + 1] = ws
        removed[#removed + 1] = field
        removed[#removed + 1] = v
      end
    end
  end
  redis.call('SREM', own, m)
end
if #ARGV == 2 then redis.call('DEL', own) end
return removed
"#;

/// Records that a client is connected to the calling instance, unless another live instance
/// already holds it: then returns that instance's claim and writes nothing. ARGV: prefix,
/// workspace, client, this instance, the claim to write, now in ms.
const CLAIM_SCRIPT: &str = r#"
local prefix, ws, client, me, claim, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local key = prefix .. 'cli:' .. ws
local current = redis.call('HGET', key, client)
if current then
  local owner = string.match(current, '^[^\n]*')
  if owner ~= me then
    local lease = redis.call('ZSCORE', prefix .. 'instances', owner)
    if lease and tonumber(lease) > now then
      return current
    end
  end
end
redis.call('HSET', key, client, claim)
redis.call('SADD', prefix .. 'own:' .. me, 'c\n' .. ws .. '\n' .. client)
return false
"#;

/// A client's entry in the shared registry: who holds it, since when, and whether that
/// connection proved itself with the client's reconnection token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientClaim {
    pub owner: String,
    pub since_ms: i64,
    pub reconnected: bool,
}

impl ClientClaim {
    fn encode(&self) -> String {
        let proof = if self.reconnected { "r" } else { "n" };
        format!("{}\n{}\n{proof}", self.owner, self.since_ms)
    }

    /// Reads a stored claim; an entry written by an older version holds only the owner.
    fn decode(value: &str) -> Self {
        let mut parts = value.split('\n');
        let owner = parts.next().unwrap_or("").to_string();
        let since_ms = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let reconnected = parts.next() == Some("r");
        Self {
            owner,
            since_ms,
            reconnected,
        }
    }

    /// Which of two claims on one client keeps it: the newer one if it came back with the
    /// client's reconnection token (the client moved), the older one otherwise (a newer
    /// claim without that proof is an intruder).
    pub(crate) fn wins_over(&self, other: &ClientClaim) -> bool {
        let (newer, older) = if (self.since_ms, &self.owner) > (other.since_ms, &other.owner) {
            (self, other)
        } else {
            (other, self)
        };
        let winner = if newer.reconnected { newer } else { older };
        std::ptr::eq(winner, self)
    }
}

/// What a dead instance left behind, for the events that announce it.
#[derive(Debug, Default)]
pub struct Released {
    pub services: Vec<ServiceEntry>,
    /// `(workspace, client)`.
    pub clients: Vec<(String, String)>,
}

/// The shared registry in Redis.
pub(crate) struct RedisDirectory {
    instance: String,
    conn: ConnectionManager,
    release: redis::Script,
    claim: redis::Script,
    /// Lease ends (ms since the epoch) of the instances seen at the last heartbeat.
    leases: RwLock<HashMap<String, i64>>,
    /// Where this instance's link listens, if it has one (written at every heartbeat).
    link: std::sync::OnceLock<String>,
    /// Where the other instances' links listen, as of the last heartbeat.
    links: RwLock<HashMap<String, String>>,
    /// Instances found without a link lately, and when (asked again after a heartbeat).
    unlinked: std::sync::Mutex<HashMap<String, std::time::Instant>>,
    /// Serialises this instance's writes with its resync, so a resync never restores an
    /// entry removed while it ran.
    pub writes: tokio::sync::Mutex<()>,
}

fn unavailable(e: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!(
        "the shared service registry (Redis) is unavailable: {e}"
    ))
}

/// The sorted set of instance leases.
const INSTANCES: &str = "hypha-rtc:instances";
/// The hash of instance link addresses.
const LINKS: &str = "hypha-rtc:links";

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn key(kind: &str, name: &str) -> String {
    format!("{PREFIX}{kind}:{name}")
}

fn member(kind: char, ws: &str, field: &str) -> String {
    format!("{kind}\n{ws}\n{field}")
}

async fn timed<T>(work: impl Future<Output = redis::RedisResult<T>>) -> Result<T, Error> {
    tokio::time::timeout(COMMAND_TIMEOUT, work)
        .await
        .map_err(|_| unavailable("no answer within 2 s"))?
        .map_err(unavailable)
}

impl RedisDirectory {
    pub(crate) fn new(instance: String, conn: ConnectionManager) -> Self {
        Self {
            instance,
            conn,
            release: redis::Script::new(RELEASE_SCRIPT),
            claim: redis::Script::new(CLAIM_SCRIPT),
            leases: RwLock::new(HashMap::new()),
            link: std::sync::OnceLock::new(),
            links: RwLock::new(HashMap::new()),
            unlinked: std::sync::Mutex::new(HashMap::new()),
            writes: tokio::sync::Mutex::new(()),
        }
    }

    /// Advertises where this instance's link listens, from the next heartbeat on.
    pub(crate) fn advertise_link(&self, address: String) {
        let _ = self.link.set(address);
    }

    pub(crate) fn instance(&self) -> &str {
        &self.instance
    }

    /// Whether `owner`'s entries count: this instance, one whose lease runs, or one too new
    /// to have been seen yet.
    fn is_live(&self, owner: &str, now: i64) -> bool {
        owner == self.instance
            || self
                .leases
                .read()
                .map(|l| l.get(owner).is_none_or(|end| *end > now))
                .unwrap_or(true)
    }

    /// Claims this instance's id. A restart under the same id finds the lease its previous
    /// run left and waits it out; a live twin keeps renewing its lease, so the claim fails.
    pub(crate) async fn claim(&self) -> Result<(), Error> {
        let patience = LEASE + 2 * HEARTBEAT;
        let deadline = std::time::Instant::now() + patience;
        let mut warned = false;
        loop {
            let mut conn = self.conn.clone();
            let end: Option<f64> = timed(
                redis::cmd("ZSCORE")
                    .arg(INSTANCES)
                    .arg(&self.instance)
                    .query_async(&mut conn),
            )
            .await?;
            if end.is_none_or(|end| end as i64 <= now_ms()) {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(Error::BadRequest(format!(
                    "another live instance uses the server id {:?}; give each instance its own --server-id (or none)",
                    self.instance
                )));
            }
            if !warned {
                tracing::warn!(instance = %self.instance, "the server id holds a lease; waiting up to {} s for it to run out", patience.as_secs());
                warned = true;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Renews this instance's lease and reads everyone's. Returns true when Redis did not
    /// know this instance (it restarted, or the lease ran out): its entries must be rewritten.
    pub(crate) async fn heartbeat(&self) -> Result<bool, Error> {
        let now = now_ms();
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.cmd("ZADD")
            .arg(INSTANCES)
            .arg(now + LEASE.as_millis() as i64)
            .arg(&self.instance)
            .cmd("ZRANGE")
            .arg(INSTANCES)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .cmd("HGETALL")
            .arg(LINKS);
        if let Some(link) = self.link.get() {
            pipe.cmd("HSET")
                .arg(LINKS)
                .arg(&self.instance)
                .arg(link)
                .ignore();
        }
        let (added, leases, links): (i64, Vec<(String, f64)>, HashMap<String, String>) =
            timed(pipe.query_async(&mut conn)).await?;
        if let Ok(mut known) = self.leases.write() {
            *known = leases.into_iter().map(|(i, end)| (i, end as i64)).collect();
        }
        if let Ok(mut known) = self.links.write() {
            *known = links;
            known.remove(&self.instance);
        }
        Ok(added == 1)
    }

    /// Where `instance`'s link listens: as of the last heartbeat, or asked now for an instance
    /// newer than that (at most once a heartbeat for one without a link).
    pub(crate) async fn link_of(&self, instance: &str) -> Result<Option<String>, Error> {
        if let Some(known) = self
            .links
            .read()
            .ok()
            .and_then(|l| l.get(instance).cloned())
        {
            return Ok(Some(known));
        }
        let now = std::time::Instant::now();
        let asked_lately = self.unlinked.lock().is_ok_and(|mut asked| {
            asked.retain(|_, at| now.duration_since(*at) < HEARTBEAT);
            asked.contains_key(instance)
        });
        if asked_lately {
            return Ok(None);
        }
        let mut conn = self.conn.clone();
        let found: Option<String> = timed(
            redis::cmd("HGET")
                .arg(LINKS)
                .arg(instance)
                .query_async(&mut conn),
        )
        .await?;
        match &found {
            Some(link) => {
                if let Ok(mut known) = self.links.write() {
                    known.insert(instance.to_string(), link.clone());
                }
            }
            None => {
                if let Ok(mut asked) = self.unlinked.lock() {
                    asked.insert(instance.to_string(), now);
                }
            }
        }
        Ok(found)
    }

    /// Whether links are in use: this instance has one, or another had at the last heartbeat.
    pub(crate) fn any_links(&self) -> bool {
        self.link.get().is_some() || self.links.read().map(|l| !l.is_empty()).unwrap_or(false)
    }

    /// Instances whose lease runs, by id.
    pub(crate) fn live(&self) -> Vec<String> {
        let now = now_ms();
        let mut live: Vec<String> = self
            .leases
            .read()
            .map(|l| {
                l.iter()
                    .filter(|(_, end)| **end > now)
                    .map(|(i, _)| i.clone())
                    .collect()
            })
            .unwrap_or_default();
        live.sort();
        live
    }

    /// Instances whose lease ran out.
    pub(crate) fn expired(&self) -> Vec<String> {
        let now = now_ms();
        self.leases
            .read()
            .map(|l| {
                l.iter()
                    .filter(|(i, end)| **end <= now && **i != self.instance)
                    .map(|(i, _)| i.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Removes a dead instance's entries, if this instance is the one to do it (exactly one
    /// does); returns what was removed.
    pub(crate) async fn reap(&self, dead: &str) -> Result<Released, Error> {
        let mut conn = self.conn.clone();
        let claimed: i64 = timed(
            redis::cmd("ZREM")
                .arg(INSTANCES)
                .arg(dead)
                .query_async(&mut conn),
        )
        .await?;
        if let Ok(mut known) = self.leases.write() {
            known.remove(dead);
        }
        if let Ok(mut known) = self.links.write() {
            known.remove(dead);
        }
        if claimed == 1 {
            // A twin that restarted under this id writes its own again at its next heartbeat.
            let _: Result<i64, Error> = timed(
                redis::cmd("HDEL")
                    .arg(LINKS)
                    .arg(dead)
                    .query_async(&mut conn),
            )
            .await;
        }
        if claimed == 0 {
            return Ok(Released::default());
        }
        self.run_release(dead, &[]).await
    }

    async fn run_release(&self, owner: &str, members: &[String]) -> Result<Released, Error> {
        let mut conn = self.conn.clone();
        let mut invocation = self.release.prepare_invoke();
        invocation.arg(PREFIX).arg(owner);
        for m in members {
            invocation.arg(m);
        }
        let flat: Vec<Vec<u8>> = timed(invocation.invoke_async(&mut conn)).await?;
        let mut released = Released::default();
        for item in flat.chunks_exact(4) {
            let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            match item[0].as_slice() {
                b"s" => {
                    if let Some((_, entry)) = decode_service(&item[3]) {
                        released.services.push(entry);
                    }
                }
                _ => released.clients.push((text(&item[1]), text(&item[2]))),
            }
        }
        Ok(released)
    }

    /// Publishes a service of this instance.
    pub(crate) async fn put_service(&self, entry: &ServiceEntry) -> Result<(), Error> {
        let ws = entry.id.provider.workspace.as_str();
        let field = entry.key();
        let mut conn = self.conn.clone();
        let _: () = timed(
            redis::pipe()
                .atomic()
                .hset(
                    key("svc", ws),
                    &field,
                    encode_service(&self.instance, entry),
                )
                .ignore()
                .sadd(key("own", &self.instance), member('s', ws, &field))
                .ignore()
                .query_async(&mut conn),
        )
        .await?;
        Ok(())
    }

    /// Withdraws services of this instance.
    pub(crate) async fn remove_services(&self, entries: &[ServiceEntry]) -> Result<(), Error> {
        let members: Vec<String> = entries
            .iter()
            .map(|e| member('s', e.id.provider.workspace.as_str(), &e.key()))
            .collect();
        if members.is_empty() {
            return Ok(());
        }
        self.run_release(&self.instance, &members).await.map(|_| ())
    }

    /// Records that a client is connected to this instance, unless another live instance
    /// holds it; then returns that instance's claim.
    pub(crate) async fn claim_client(
        &self,
        ws: &str,
        client: &str,
        since_ms: i64,
        reconnected: bool,
    ) -> Result<Option<ClientClaim>, Error> {
        let claim = ClientClaim {
            owner: self.instance.clone(),
            since_ms,
            reconnected,
        };
        let mut conn = self.conn.clone();
        let mut invocation = self.claim.prepare_invoke();
        invocation
            .arg(PREFIX)
            .arg(ws)
            .arg(client)
            .arg(&self.instance)
            .arg(claim.encode())
            .arg(now_ms());
        let other: Option<String> = timed(invocation.invoke_async(&mut conn)).await?;
        Ok(other.map(|v| ClientClaim::decode(&v)))
    }

    /// Records a client of this instance whatever holds it now (after this instance won it).
    pub(crate) async fn force_client(
        &self,
        ws: &str,
        client: &str,
        since_ms: i64,
        reconnected: bool,
    ) -> Result<(), Error> {
        let claim = ClientClaim {
            owner: self.instance.clone(),
            since_ms,
            reconnected,
        };
        let mut conn = self.conn.clone();
        let _: () = timed(
            redis::pipe()
                .atomic()
                .hset(key("cli", ws), client, claim.encode())
                .ignore()
                .sadd(key("own", &self.instance), member('c', ws, client))
                .ignore()
                .query_async(&mut conn),
        )
        .await?;
        Ok(())
    }

    /// Forgets a client of this instance.
    pub(crate) async fn remove_client(&self, ws: &str, client: &str) -> Result<(), Error> {
        self.run_release(&self.instance, &[member('c', ws, client)])
            .await
            .map(|_| ())
    }

    /// The live instance other than this one that holds `ws/client`, if any.
    pub(crate) async fn client_elsewhere(
        &self,
        ws: &str,
        client: &str,
    ) -> Result<Option<String>, Error> {
        let mut conn = self.conn.clone();
        let owner: Option<String> = timed(
            redis::cmd("HGET")
                .arg(key("cli", ws))
                .arg(client)
                .query_async(&mut conn),
        )
        .await?;
        let now = now_ms();
        Ok(owner
            .map(|v| ClientClaim::decode(&v).owner)
            .filter(|o| *o != self.instance && self.is_live(o, now)))
    }

    /// Clients of a workspace on the other live instances.
    pub(crate) async fn clients_in(&self, ws: &str) -> Result<Vec<String>, Error> {
        let mut conn = self.conn.clone();
        let all: Vec<(String, String)> = timed(
            redis::cmd("HGETALL")
                .arg(key("cli", ws))
                .query_async(&mut conn),
        )
        .await?;
        let now = now_ms();
        Ok(all
            .into_iter()
            .map(|(client, value)| (client, ClientClaim::decode(&value).owner))
            .filter(|(_, owner)| *owner != self.instance && self.is_live(owner, now))
            .map(|(client, _)| client)
            .collect())
    }

    /// Services of a workspace on the other live instances.
    pub(crate) async fn services_in(&self, ws: &str) -> Result<Vec<ServiceEntry>, Error> {
        let mut conn = self.conn.clone();
        let all: Vec<(String, Vec<u8>)> = timed(
            redis::cmd("HGETALL")
                .arg(key("svc", ws))
                .query_async(&mut conn),
        )
        .await?;
        let now = now_ms();
        Ok(all
            .iter()
            .filter_map(|(_, value)| decode_service(value))
            .filter(|(owner, _)| *owner != self.instance && self.is_live(owner, now))
            .map(|(_, entry)| entry)
            .collect())
    }

    /// Writes this instance's entries again from its local state, and drops any it no longer
    /// has. Run after Redis came back or forgot this instance.
    pub(crate) async fn resync(
        &self,
        services: &[ServiceEntry],
        clients: &[(String, String)],
    ) -> Result<(), Error> {
        // The clients themselves are claimed one by one by the caller (a claim can conflict);
        // here they only count as wanted, so their entries are not dropped as stale.
        let own = key("own", &self.instance);
        let mut conn = self.conn.clone();
        let recorded: Vec<String> =
            timed(redis::cmd("SMEMBERS").arg(&own).query_async(&mut conn)).await?;
        let mut pipe = redis::pipe();
        pipe.atomic();
        let mut wanted = HashSet::new();
        for entry in services {
            let ws = entry.id.provider.workspace.as_str();
            let field = entry.key();
            pipe.hset(
                key("svc", ws),
                &field,
                encode_service(&self.instance, entry),
            )
            .ignore();
            wanted.insert(member('s', ws, &field));
        }
        for (ws, client) in clients {
            wanted.insert(member('c', ws, client));
        }
        let stale: Vec<String> = recorded
            .into_iter()
            .filter(|m| !wanted.contains(m))
            .collect();
        if !stale.is_empty() {
            self.run_release(&self.instance, &stale).await?;
        }
        if !wanted.is_empty() {
            pipe.sadd(&own, wanted.into_iter().collect::<Vec<_>>())
                .ignore();
            let _: () = timed(pipe.query_async(&mut conn)).await?;
        }
        Ok(())
    }
}

fn encode_service(owner: &str, entry: &ServiceEntry) -> Vec<u8> {
    let mut out = format!("{owner}\n").into_bytes();
    let body = Value::Array(vec![
        entry.seq().into(),
        entry.id.to_string().into(),
        (*entry.info).clone(),
    ]);
    out.extend(crate::rpc::value::encode(&body));
    out
}

/// Reads a stored service: its owner and entry; `None` for anything malformed.
fn decode_service(value: &[u8]) -> Option<(String, ServiceEntry)> {
    let split = value.iter().position(|b| *b == b'\n')?;
    let owner = std::str::from_utf8(&value[..split]).ok()?.to_string();
    let mut reader = &value[split + 1..];
    let Value::Array(mut items) = rmpv::decode::read_value_with_max_depth(&mut reader, 64).ok()?
    else {
        return None;
    };
    if items.len() != 3 {
        return None;
    }
    let info = items.pop()?;
    let id = ServiceId::parse(items.pop()?.as_str()?).ok()?;
    let seq = items.pop()?.as_u64()?;
    let entry = ServiceEntry::from_info(id, info).ok()?.with_seq(seq);
    Some((owner, entry))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::value::obj;

    #[test]
    fn stored_services_round_trip() {
        let id = ServiceId::parse("ws1/c1:echo").unwrap();
        let info = obj([
            ("id", "ws1/c1:echo".into()),
            ("config", obj([("visibility", "public".into())])),
        ]);
        let entry = ServiceEntry::from_info(id, info).unwrap().with_seq(42);
        let stored = encode_service("inst-a", &entry);
        let (owner, back) = decode_service(&stored).unwrap();
        assert_eq!(owner, "inst-a");
        assert_eq!(back.seq(), 42);
        assert_eq!(back.id, entry.id);
        assert_eq!(back.info, entry.info);
        assert!(decode_service(b"no newline").is_none());
        assert!(decode_service(b"owner\n\x01").is_none());
    }

    #[test]
    fn the_newer_claim_wins_only_with_a_reconnection_token() {
        let claim = |owner: &str, since_ms, reconnected| ClientClaim {
            owner: owner.into(),
            since_ms,
            reconnected,
        };
        let old = claim("a", 100, false);
        let intruder = claim("b", 200, false);
        let moved = claim("b", 200, true);
        assert!(old.wins_over(&intruder) && !intruder.wins_over(&old));
        assert!(moved.wins_over(&old) && !old.wins_over(&moved));
        let stored = moved.encode();
        assert_eq!(ClientClaim::decode(&stored), moved);
        assert_eq!(ClientClaim::decode("legacy").owner, "legacy");
    }
}
