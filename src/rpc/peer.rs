//! The server's own RPC peer: it decodes calls addressed to the services the server hosts,
//! answers them through the caller's promise, makes calls of its own to clients (with
//! heartbeats and time-outs), and chunks large messages through `message_cache` both ways.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use futures_util::future::BoxFuture;
use rmpv::Value;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot};

use super::RpcError as Error;
use super::frame::{self, Frame};
use super::scan::Limits;
use super::value::{self, Args, get, get_str, obj};
use crate::auth::UserInfo;

/// Messages above this size are sent in chunks; hypha-rpc clients cannot receive a single
/// frame over 512 000 bytes. The same threshold the clients use for their own sends.
pub(crate) const CHUNK_SIZE: usize = 256 * 1024;
const CHUNK_THRESHOLD: usize = CHUNK_SIZE + 1024;
/// What decoding the calls to the server may hold in memory at once, over all callers: a
/// call's decoded arguments (and its result) count until its answer is sent.
const DECODE_BUDGET: usize = 512 * 1024 * 1024;
/// The same for anonymous callers together, so they cannot take all of it.
const DECODE_BUDGET_ANONYMOUS: usize = 128 * 1024 * 1024;

/// A frame for the server, with the identity the hub established.
#[derive(Debug)]
pub(crate) struct Incoming {
    pub from: String,
    pub ws: String,
    pub user: Arc<UserInfo>,
    /// The normalised target, e.g. `*/manager-x` or `public/manager-x`.
    pub to: String,
    pub frame: Frame,
    /// The network address of the caller, where known.
    pub peer_ip: Option<std::net::IpAddr>,
    /// The caller's budget of calls to the server running at once (a call it makes in chunks
    /// takes its place from it too).
    pub slots: Option<Arc<Semaphore>>,
}

/// Who is calling: taken from the hub, never from the frame.
#[derive(Debug, Clone)]
pub(crate) struct CallContext {
    pub from: String,
    pub ws: String,
    pub user: Arc<UserInfo>,
    /// The address the caller sent to; replies come from it.
    pub to: String,
    /// The caller's network address (behind a trusted proxy, the client's), where known.
    pub peer_ip: Option<std::net::IpAddr>,
    /// The caller's budget of calls to the server running at once.
    pub slots: Option<Arc<Semaphore>>,
}

/// Where to send a call's outcome.
#[derive(Debug, Clone)]
pub(crate) struct ReplyTo {
    pub resolve: String,
    pub reject: String,
    pub heartbeat: Option<String>,
    pub interval: Option<Duration>,
}

/// A decoded call to a hosted service.
#[derive(Debug)]
pub(crate) struct Call {
    pub ctx: CallContext,
    pub method: String,
    pub args: Args,
    pub reply: Option<ReplyTo>,
    /// The memory its decoding took from the server's budget, given back when it is dropped.
    pub budget: Option<OwnedSemaphorePermit>,
}

impl Call {
    /// The service and function a call names: `services.<service>.<function>`.
    pub(crate) fn target(&self) -> Result<(&str, &str), Error> {
        let not_found = || Error::NotFound(format!("Method not found: {}", self.method));
        self.method
            .strip_prefix("services.")
            .and_then(|path| path.split_once('.'))
            .ok_or_else(not_found)
    }
}

/// What an incoming frame is.
#[derive(Debug)]
pub(crate) enum Decoded {
    Call(Box<Call>),
    /// An answer to one of the server's own calls.
    Reply,
    Ignored,
}

struct Pending {
    target: String,
    done: Option<oneshot::Sender<Result<Value, Error>>>,
    heartbeat: Arc<Notify>,
}

/// Options of an outgoing call.
pub(crate) struct CallOptions<'a> {
    /// The address the call comes from (a manager address of this server).
    pub from: &'a str,
    /// The `ws` the callee sees in its context.
    pub ws: &'a str,
    pub user: &'a Value,
    pub timeout: Duration,
    /// The last argument is a kwargs dict.
    pub with_kwargs: bool,
}

/// Where the server's own RPC peer sends its frames (the hub, in the running server), so the
/// wire layer knows nothing of connections.
pub(crate) trait Outbox: Send + Sync {
    /// Hands a frame to the client at `to`, wherever it is connected.
    fn send<'a>(&'a self, to: &'a str, frame: Bytes) -> BoxFuture<'a, Result<(), Error>>;
    /// The id the server's manager goes by: the address the server peer speaks from.
    fn manager_id(&self) -> &str;
}

/// The server's RPC peer.
pub struct ServerPeer {
    outbox: Arc<dyn Outbox>,
    pending: DashMap<String, Pending>,
    /// Chunked messages clients are sending to the server.
    pub cache: super::cache::MessageCache,
    /// Memory for decoding calls, in KiB: all callers, and anonymous ones.
    budget: Arc<Semaphore>,
    budget_anonymous: Arc<Semaphore>,
    /// The `user` field of messages the server itself sends.
    pub server_user: Value,
}

impl ServerPeer {
    pub(crate) fn new(outbox: Arc<dyn Outbox>, server_user: &UserInfo) -> Self {
        Self {
            outbox,
            pending: DashMap::new(),
            cache: Default::default(),
            budget: Arc::new(Semaphore::new(DECODE_BUDGET / 1024)),
            budget_anonymous: Arc::new(Semaphore::new(DECODE_BUDGET_ANONYMOUS / 1024)),
            server_user: super::value::from_json(&server_user.to_json()),
        }
    }

    /// The manager's global address.
    pub(crate) fn manager_addr(&self) -> String {
        format!("*/{}", self.outbox.manager_id())
    }

    /// Decodes a frame: a call to a hosted service, or a reply to one of our calls.
    pub(crate) fn decode(&self, incoming: Incoming) -> Result<Decoded, Error> {
        let anonymous = incoming.user.is_anonymous();
        let Some(message) = MethodMessage::read(&incoming.frame, anonymous)? else {
            return Ok(Decoded::Ignored);
        };
        if let Some((session, kind)) = message.method.split_once('.')
            && let Some(mut pending) = self.pending.get_mut(session)
        {
            if pending.target != incoming.from {
                tracing::warn!(from = %incoming.from, "reply to a session of another peer ignored");
                return Ok(Decoded::Ignored);
            }
            let first = message.args.into_iter().next().unwrap_or(Value::Nil);
            match kind {
                "heartbeat" => pending.heartbeat.notify_one(),
                "resolve" => {
                    if let Some(done) = pending.done.take() {
                        let _ = done.send(Ok(first));
                    }
                }
                "reject" => {
                    let message = get_str(&first, "_rvalue")
                        .or(first.as_str())
                        .unwrap_or("the remote call failed")
                        .to_string();
                    if let Some(done) = pending.done.take() {
                        let _ = done.send(Err(Error::Remote(message)));
                    }
                }
                _ => {}
            }
            return Ok(Decoded::Reply);
        }
        let kib = (message.decoded / 1024).max(1).min(u64::from(u32::MAX)) as u32;
        let pool = if anonymous {
            &self.budget_anonymous
        } else {
            &self.budget
        };
        let budget = pool.clone().try_acquire_many_owned(kib).map_err(|_| {
            Error::Busy("the server is busy with other large calls; try again shortly".into())
        })?;
        let mut call = message.into_call(incoming)?;
        call.budget = Some(budget);
        Ok(Decoded::Call(Box::new(call)))
    }

    /// Sends a `method` message from the server. Replies always go back to the caller itself,
    /// whatever target the caller's promise named.
    pub(crate) async fn send_method(
        &self,
        from: &str,
        to: &str,
        method: &str,
        args: Vec<Value>,
        ws: &str,
        user: &Value,
    ) -> Result<(), Error> {
        let data = method_frame(from, to, method, args, ws, user);
        self.deliver(from, ws, to, data).await
    }

    /// Sends the outcome of a call to its caller (in chunks if it is large); an error is the
    /// message the caller is to see.
    pub(crate) async fn reply(&self, call: &Call, outcome: Result<Value, Rejection>) {
        let Some(data) = reply_frame(call, outcome, &self.server_user) else {
            return;
        };
        if let Err(e) = self.deliver(&call.ctx.to, "*", &call.ctx.from, data).await {
            tracing::debug!(error = %e, caller = %call.ctx.from, "reply not delivered");
        }
    }

    /// Sends a heartbeat for a long call, so the caller's time-out does not fire.
    pub(crate) async fn heartbeat(&self, call: &Call) {
        if let Some(method) = call.reply.as_ref().and_then(|r| r.heartbeat.as_ref()) {
            let _ = self
                .send_method(
                    &call.ctx.to,
                    &call.ctx.from,
                    method,
                    vec![],
                    "*",
                    &self.server_user,
                )
                .await;
        }
    }

    /// Delivers an encoded message, chunking it through the target's `message_cache` if large.
    async fn deliver(&self, from: &str, ws: &str, to: &str, data: Bytes) -> Result<(), Error> {
        if data.len() <= CHUNK_THRESHOLD {
            return self.outbox.send(to, data).await;
        }
        let key = crate::ids::random_id(20);
        let options = CallOptions {
            from,
            ws,
            user: &self.server_user,
            timeout: Duration::from_secs(30),
            with_kwargs: false,
        };
        let cache = |name: &str| format!("services.built-in.message_cache.{name}");
        self.call(
            to,
            &cache("create"),
            vec![key.as_str().into(), false.into()],
            &options,
        )
        .await?;
        for (index, chunk) in data.chunks(CHUNK_SIZE).enumerate() {
            let args = vec![
                key.as_str().into(),
                (index as u64).into(),
                Value::Binary(chunk.to_vec()),
                false.into(),
            ];
            self.call(to, &cache("set"), args, &options).await?;
        }
        self.call(
            to,
            &cache("process"),
            vec![key.as_str().into(), false.into()],
            &options,
        )
        .await?;
        Ok(())
    }

    /// Calls a function on a client and waits for its answer; heartbeats extend the time-out.
    pub(crate) async fn call(
        &self,
        target: &str,
        method: &str,
        args: Vec<Value>,
        options: &CallOptions<'_>,
    ) -> Result<Value, Error> {
        let session = crate::ids::random_id(20);
        let (done, mut answer) = oneshot::channel();
        let heartbeat = Arc::new(Notify::new());
        self.pending.insert(
            session.clone(),
            Pending {
                target: target.to_string(),
                done: Some(done),
                heartbeat: heartbeat.clone(),
            },
        );
        let _guard = PendingGuard {
            peer: self,
            session: &session,
        };
        let callback = |kind: &str| {
            value::method_value(options.from, &format!("{session}.{kind}"), false.into())
        };
        let header = obj([
            ("type", "method".into()),
            ("from", options.from.into()),
            ("to", target.into()),
            ("method", method.into()),
            ("session", session.as_str().into()),
            ("ws", options.ws.into()),
            ("user", options.user.clone()),
        ]);
        let body = obj([
            ("args", Value::Array(args)),
            ("with_kwargs", options.with_kwargs.into()),
            (
                "promise",
                obj([
                    ("resolve", callback("resolve")),
                    ("reject", callback("reject")),
                    ("heartbeat", callback("heartbeat")),
                    ("interval", (options.timeout.as_secs_f64() / 2.0).into()),
                ]),
            ),
        ]);
        let data = frame::encode(&header, Some(&body));
        Box::pin(self.deliver(options.from, options.ws, target, data)).await?;
        loop {
            tokio::select! {
                outcome = &mut answer => {
                    return outcome.unwrap_or_else(|_| Err(Error::Unavailable(format!("Target peer {target} is not connected"))));
                }
                _ = heartbeat.notified() => continue,
                _ = tokio::time::sleep(options.timeout) => {
                    return Err(Error::Timeout(format!("{target} did not answer {method} within {} s", options.timeout.as_secs())));
                }
            }
        }
    }

    /// Fails the server's calls to a client that went away, and drops its cached chunks.
    pub(crate) fn peer_gone(&self, addr: &str) {
        for mut entry in self.pending.iter_mut() {
            if entry.target == addr
                && let Some(done) = entry.done.take()
            {
                let _ = done.send(Err(Error::Unavailable(format!(
                    "Target peer {addr} is not connected"
                ))));
            }
        }
        self.cache.forget(addr);
    }
}

/// The parts of a `method` message, before it is known to be a call or a reply.
struct MethodMessage {
    method: String,
    args: Vec<Value>,
    body: Value,
    session: Option<String>,
    /// What decoding the body takes in memory (estimated by the scan).
    decoded: u64,
}

/// Most values a call's body may decode into, by kind of caller.
const MAX_ELEMENTS_SIGNED_IN: u64 = 1_000_000;
const MAX_ELEMENTS_ANONYMOUS: u64 = 100_000;
/// How many times its size a body may take in memory once decoded (plus some slack).
const MAX_AMPLIFICATION_SIGNED_IN: u64 = 8;
const MAX_AMPLIFICATION_ANONYMOUS: u64 = 4;

impl MethodMessage {
    /// Reads a `method` frame; `None` for any other type.
    fn read(frame: &Frame, anonymous: bool) -> Result<Option<Self>, Error> {
        if frame.field("type") != Some("method") {
            return Ok(None);
        }
        let method = frame
            .field("method")
            .ok_or_else(|| Error::BadRequest("the call names no method".into()))?
            .to_string();
        let (mut body, decoded) = if frame.body.is_empty() {
            (Value::Map(Vec::new()), 0)
        } else {
            let limits = if anonymous {
                Limits::decode(
                    frame.body.len(),
                    MAX_ELEMENTS_ANONYMOUS,
                    MAX_AMPLIFICATION_ANONYMOUS,
                )
            } else {
                Limits::decode(
                    frame.body.len(),
                    MAX_ELEMENTS_SIGNED_IN,
                    MAX_AMPLIFICATION_SIGNED_IN,
                )
            };
            let scanned = super::scan::object(&frame.body, limits)
                .map_err(|e| Error::BadRequest(format!("the call body {e}")))?;
            let (body, _) = super::scan::decode(&frame.body, limits)
                .map_err(|e| Error::BadRequest(format!("the call body {e}")))?;
            (body, scanned.decoded)
        };
        if get(&body, "_enc").is_some() {
            return Err(Error::BadRequest(
                "end-to-end encrypted calls to the server are not supported".into(),
            ));
        }
        let args = match take(&mut body, "args") {
            Some(Value::Array(items)) => items,
            Some(Value::Nil) | None => Vec::new(),
            Some(_) => return Err(Error::BadRequest("args must be a list".into())),
        };
        Ok(Some(Self {
            method,
            args,
            body,
            session: frame.field("session").map(str::to_string),
            decoded,
        }))
    }

    /// A call, with where its outcome goes (either promise form hypha-rpc uses).
    fn into_call(self, incoming: Incoming) -> Result<Call, Error> {
        let Self {
            method,
            args,
            body,
            session,
            ..
        } = self;
        let with_kwargs = get(&body, "with_kwargs")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let reply = match get(&body, "promise") {
            Some(Value::String(s)) if s.as_str() == Some("*") => {
                let session = session
                    .ok_or_else(|| Error::BadRequest("promise \"*\" needs a session".into()))?;
                Some(ReplyTo {
                    resolve: format!("{session}.resolve"),
                    reject: format!("{session}.reject"),
                    heartbeat: Some(format!("{session}.heartbeat")),
                    interval: get(&body, "t").and_then(seconds),
                })
            }
            Some(promise @ Value::Map(_)) => {
                let method_of = |key| {
                    get(promise, key)
                        .and_then(|m| get_str(m, "_rmethod"))
                        .map(str::to_string)
                };
                match (method_of("resolve"), method_of("reject")) {
                    (Some(resolve), Some(reject)) => Some(ReplyTo {
                        resolve,
                        reject,
                        heartbeat: method_of("heartbeat"),
                        interval: get(promise, "interval").and_then(seconds),
                    }),
                    _ => {
                        return Err(Error::BadRequest(
                            "the promise lacks resolve or reject".into(),
                        ));
                    }
                }
            }
            _ => None,
        };
        let Incoming {
            from,
            ws,
            user,
            to,
            peer_ip,
            slots,
            ..
        } = incoming;
        Ok(Call {
            ctx: CallContext {
                from,
                ws,
                user,
                to,
                peer_ip,
                slots,
            },
            method,
            args: Args::from_call(args, with_kwargs),
            reply,
            budget: None,
        })
    }
}

/// Decodes a call for a peer that makes no calls of its own (a data-channel peer): `None` for
/// frames that are not calls.
pub(crate) fn decode_call(incoming: Incoming) -> Result<Option<Call>, Error> {
    let anonymous = incoming.user.is_anonymous();
    match MethodMessage::read(&incoming.frame, anonymous)? {
        Some(message) => message.into_call(incoming).map(Some),
        None => Ok(None),
    }
}

/// Why a call failed, in the words its caller is to see (nothing internal).
#[derive(Debug)]
pub(crate) struct Rejection(pub(crate) String);

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The frame that carries a call's outcome back to its caller, sent from the address the
/// caller called; `None` when the call asked for no answer.
pub(crate) fn reply_frame(
    call: &Call,
    outcome: Result<Value, Rejection>,
    user: &Value,
) -> Option<Bytes> {
    let Some(reply) = &call.reply else {
        if let Err(e) = outcome {
            tracing::debug!(method = ?call.method, error = %e, "call without promise failed");
        }
        return None;
    };
    let (method, value) = match outcome {
        Ok(v) => (&reply.resolve, v),
        Err(Rejection(message)) => (&reply.reject, value::error_value(&message)),
    };
    Some(method_frame(
        &call.ctx.to,
        &call.ctx.from,
        method,
        vec![value],
        "*",
        user,
    ))
}

/// The answer to a call that the server refused to deliver: a reject from `callee` to
/// `caller`'s promise, so the caller learns why at once instead of waiting for its time-out.
/// `None` when the frame is not a call with a promise.
pub(crate) fn refusal(frame: &Frame, callee: &str, caller: &str, message: &str) -> Option<Bytes> {
    use std::sync::LazyLock;
    static SERVER_USER: LazyLock<Value> =
        LazyLock::new(|| super::value::from_json(&UserInfo::server().to_json()));
    if frame.field("type") != Some("method") {
        return None;
    }
    let promise = super::scan::map_value(&frame.body, "promise")?;
    let (promise, _) = super::scan::decode(promise, Limits::decode(promise.len(), 64, 8)).ok()?;
    let reject = match &promise {
        Value::String(s) if s.as_str() == Some("*") => {
            format!("{}.reject", frame.field("session")?)
        }
        Value::Map(_) => get(&promise, "reject")
            .and_then(|m| get_str(m, "_rmethod"))?
            .to_string(),
        _ => return None,
    };
    let error = value::error_value(message);
    Some(method_frame(
        callee,
        caller,
        &reject,
        vec![error],
        "*",
        &SERVER_USER,
    ))
}

/// A `method` message with no promise: replies, heartbeats and other one-way calls.
pub(crate) fn method_frame(
    from: &str,
    to: &str,
    method: &str,
    args: Vec<Value>,
    ws: &str,
    user: &Value,
) -> Bytes {
    let header = obj([
        ("type", "method".into()),
        ("from", from.into()),
        ("to", to.into()),
        ("method", method.into()),
        ("ws", ws.into()),
        ("user", user.clone()),
    ]);
    let body = obj([("args", Value::Array(args))]);
    frame::encode(&header, Some(&body))
}

/// Removes a pending call however its wait ends.
struct PendingGuard<'a> {
    peer: &'a ServerPeer,
    session: &'a str,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.peer.pending.remove(self.session);
    }
}

/// Moves a key's value out of a map (instead of cloning a possibly large argument list).
fn take(map: &mut Value, key: &str) -> Option<Value> {
    let Value::Map(entries) = map else {
        return None;
    };
    let index = entries.iter().position(|(k, _)| k.as_str() == Some(key))?;
    Some(entries.swap_remove(index).1)
}

/// A heartbeat interval a caller asks for: at least a second (a caller cannot make the server
/// send heartbeats by the thousand), at most a day.
fn seconds(v: &Value) -> Option<Duration> {
    let s = v.as_f64().or_else(|| v.as_i64().map(|i| i as f64))?;
    (s.is_finite() && s > 0.0 && s < 86_400.0).then(|| Duration::from_secs_f64(s.max(1.0)))
}
