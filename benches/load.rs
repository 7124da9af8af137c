//! The load client: speaks the Hypha wire protocol natively (raw frames, no RPC library) so the
//! client is not the bottleneck, and prints routed-call latency, routed messages per second and
//! server memory per idle connection.
//!
//! `cargo bench --bench load` starts the release `hypha-rtc` and measures it;
//! `cargo bench --bench load -- --url ws://HOST:PORT/ws --pid PID --label NAME` measures any
//! Hypha-protocol server (the Python Hypha server too). See `scripts/bench.sh`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use rmpv::Value;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

mod common;

#[derive(Parser, Debug)]
struct Options {
    /// Websocket URL of the server; without it, the release hypha-rtc is started.
    #[arg(long)]
    url: Option<String>,
    /// Process id of the server, for its memory figures.
    #[arg(long)]
    pid: Option<u32>,
    #[arg(long, default_value = "hypha-rtc")]
    label: String,
    /// Websocket URL the responders connect to (another instance of a cluster, for the
    /// cross-instance figures) [default: --url]
    #[arg(long)]
    responder_url: Option<String>,
    /// Sequential calls for the single-pair figures.
    #[arg(long, default_value_t = 5000)]
    calls: usize,
    /// Concurrent pairs.
    #[arg(long, default_value_t = 100)]
    pairs: usize,
    /// Seconds each concurrent phase runs.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Calls in flight per pair in the throughput phase.
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Idle authenticated connections for the memory figure (0 skips it).
    #[arg(long, default_value_t = 10_000)]
    idle: usize,
    /// Measure idle memory only (a server that cannot release connections quickly gets a fresh
    /// process for the other phases).
    #[arg(long)]
    idle_only: bool,
    /// Measure get_rtc_ice_servers through the websocket RPC, signed in with this token,
    /// instead of the routing figures.
    #[arg(long)]
    ice_token: Option<String>,
    /// Measure the cost of connecting as connections grow instead of the routing figures: the
    /// server CPU per 1,000 connects (and their disconnects) into one workspace, with none held
    /// and with this many held there (needs the server's token secret: the own server's).
    #[arg(long)]
    connect_cost: Option<usize>,
    /// Measure a reconnect storm instead: this many clients, each with a registered service,
    /// lose the own server to a restart (SIGTERM, then a new process on the same port and data
    /// directory) and reconnect and register again; prints how long until all had.
    #[arg(long)]
    reconnect_storm: Option<usize>,
    /// Run as a baseline process for the latency figures instead (used by this benchmark on
    /// itself): `echo` answers calls like a responder, `relay` forwards every frame between
    /// the first two websockets that connect; prints its port, then serves until killed.
    #[arg(long, hide = true, value_parser = ["echo", "relay"])]
    serve_baseline: Option<String>,
    // `cargo bench` passes --bench; accept and ignore it.
    #[arg(long, hide = true)]
    bench: bool,
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn map(entries: Vec<(&str, Value)>) -> Value {
    Value::Map(
        entries
            .into_iter()
            .map(|(k, v)| (Value::from(k), v))
            .collect(),
    )
}

fn frame(header: &Value, body: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    rmpv::encode::write_value(&mut out, header).expect("encode");
    rmpv::encode::write_value(&mut out, body).expect("encode");
    out
}

fn field<'a>(header: &'a Value, key: &str) -> Option<&'a str> {
    header
        .as_map()?
        .iter()
        .find(|(k, _)| k.as_str() == Some(key))?
        .1
        .as_str()
}

/// A call from `from` to `to` with session `s<seq>`, as hypha-rpc encodes `promise: "*"`.
fn call_frame(to: &str, seq: u64) -> Vec<u8> {
    let header = map(vec![
        ("type", "method".into()),
        ("from", "bench".into()),
        ("to", to.into()),
        ("method", "services.bench.echo".into()),
        ("session", format!("s{seq}").into()),
    ]);
    let body = map(vec![
        ("args", Value::Array(vec![Value::Binary(vec![42u8; 32])])),
        ("promise", "*".into()),
        ("t", 15.into()),
    ]);
    frame(&header, &body)
}

/// The seq of a `s<seq>.resolve` reply.
fn reply_seq(data: &[u8]) -> Option<u64> {
    let mut reader = data;
    let header = rmpv::decode::read_value(&mut reader).ok()?;
    field(&header, "method")?
        .strip_prefix('s')?
        .strip_suffix(".resolve")?
        .parse()
        .ok()
}

/// Answers every call with its argument, like a hypha-rpc service would.
async fn respond(mut socket: Socket) {
    while let Some(Ok(message)) = socket.next().await {
        let Message::Binary(data) = message else {
            continue;
        };
        let mut reader: &[u8] = &data;
        let Ok(header) = rmpv::decode::read_value(&mut reader) else {
            continue;
        };
        let (Some(from), Some(session)) = (field(&header, "from"), field(&header, "session"))
        else {
            continue;
        };
        let reply_header = map(vec![
            ("type", "method".into()),
            ("from", "responder".into()),
            ("to", from.into()),
            ("method", format!("{session}.resolve").into()),
        ]);
        let body = map(vec![(
            "args",
            Value::Array(vec![Value::Binary(vec![42u8; 32])]),
        )]);
        if socket
            .send(Message::Binary(frame(&reply_header, &body).into()))
            .await
            .is_err()
        {
            break;
        }
    }
}

/// Connects anonymously with a fresh client id; returns the socket and its address `ws/cid`.
async fn try_connect(url: &str, client_id: &str) -> Result<(Socket, String), String> {
    let (socket, info) = try_connect_as(url, client_id, None).await?;
    let ws = info["workspace"].as_str().unwrap_or_default().to_string();
    Ok((socket, format!("{ws}/{client_id}")))
}

/// Connects with an optional token; returns the socket and `connection_info`.
async fn try_connect_as(
    url: &str,
    client_id: &str,
    token: Option<&str>,
) -> Result<(Socket, serde_json::Value), String> {
    try_connect_with(url, client_id, token, None).await
}

/// The websocket settings of the connect-cost phase's clients: a small read buffer.
/// tungstenite's default allocates and zeroes 128 KiB per connection, and with it the client
/// took about 1.8 times the server's CPU per connect: the client, not the server, set the
/// connects per second.
fn lean_client() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(4096)
}

async fn try_connect_with(
    url: &str,
    client_id: &str,
    token: Option<&str>,
    config: Option<WebSocketConfig>,
) -> Result<(Socket, serde_json::Value), String> {
    let (mut socket, _) = tokio_tungstenite::connect_async_with_config(url, config, false)
        .await
        .map_err(|e| e.to_string())?;
    let hello = serde_json::json!({"client_id": client_id, "workspace": null, "token": token, "reconnection_token": null});
    socket
        .send(Message::Text(hello.to_string().into()))
        .await
        .map_err(|e| e.to_string())?;
    loop {
        match tokio::time::timeout(Duration::from_secs(30), socket.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                let info: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| e.to_string())?;
                if info["type"] != "connection_info" {
                    return Err(format!("handshake refused: {info}"));
                }
                return Ok((socket, info));
            }
            Ok(Some(Ok(_))) => continue,
            other => return Err(format!("no connection_info: {other:?}")),
        }
    }
}

async fn connect(url: &str, client_id: &str) -> (Socket, String) {
    try_connect(url, client_id).await.expect("connect")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Sequential calls over `socket` to `target`; returns sorted round trips.
async fn sequential(socket: &mut Socket, target: &str, calls: usize) -> Vec<Duration> {
    let mut rtts = Vec::with_capacity(calls);
    for seq in 0..(calls as u64 + 200) {
        let started = Instant::now();
        socket
            .send(Message::Binary(call_frame(target, seq).into()))
            .await
            .expect("send");
        loop {
            match socket.next().await {
                Some(Ok(Message::Binary(data))) if reply_seq(&data) == Some(seq) => break,
                Some(Ok(_)) => continue,
                other => panic!("connection lost during calls: {other:?}"),
            }
        }
        if seq >= 200 {
            rtts.push(started.elapsed());
        }
    }
    rtts.sort();
    rtts
}

/// Baseline: the same calls over a direct websocket, no server in between.
async fn direct_baseline(calls: usize) -> Vec<Duration> {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        if let Ok((stream, _)) = listener.accept().await
            && let Ok(socket) =
                tokio_tungstenite::accept_async(tokio_tungstenite::MaybeTlsStream::Plain(stream))
                    .await
        {
            respond(socket).await;
        }
    });
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{addr}"))
        .await
        .expect("connect");
    sequential(&mut socket, "responder", calls).await
}

/// Baselines in processes of their own: the same calls answered by an echo process, and sent
/// through a relay process to a responder here (the shape of a routed call, with nothing but
/// forwarding in between). Returns (echo round trips, relayed round trips).
async fn process_baselines(calls: usize) -> (Vec<Duration>, Vec<Duration>) {
    let echo = BaselineProcess::start("echo");
    let mut socket = echo.connect().await;
    let echoed = sequential(&mut socket, "responder", calls).await;
    drop(socket);
    drop(echo);
    let relay = BaselineProcess::start("relay");
    let responder = tokio::spawn(respond(relay.connect().await));
    let mut caller = relay.connect().await;
    let relayed = sequential(&mut caller, "responder", calls).await;
    drop(caller);
    drop(relay);
    responder.abort();
    (echoed, relayed)
}

/// A baseline that runs in a process of its own, as a server does: a round trip through it
/// pays for the wake-up of another process, which the in-process echo does not.
struct BaselineProcess {
    child: std::process::Child,
    url: String,
}

impl BaselineProcess {
    /// Starts this benchmark as `--serve-baseline KIND` and reads the port it listens on.
    fn start(kind: &str) -> Self {
        use std::io::BufRead;
        let child = std::process::Command::new(std::env::current_exe().expect("own path"))
            .args(["--serve-baseline", kind])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the baseline process");
        // Owned by the guard first: a failure below still kills and reaps the child.
        let mut baseline = Self {
            child,
            url: String::new(),
        };
        let mut line = String::new();
        let stdout = baseline.child.stdout.take().expect("stdout");
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("the baseline's port");
        let port: u16 = line.trim().parse().expect("the baseline printed its port");
        baseline.url = format!("ws://127.0.0.1:{port}");
        baseline
    }

    async fn connect(&self) -> Socket {
        tokio_tungstenite::connect_async(&self.url)
            .await
            .expect("connect to the baseline process")
            .0
    }
}

impl Drop for BaselineProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The baseline process: `echo` answers every call on each connection; `relay` forwards
/// frames both ways between the first two connections, parsing nothing (the least any
/// router between two clients can do).
async fn serve_baseline(kind: &str) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    println!("{}", listener.local_addr().expect("addr").port());
    let accept = async || {
        let (stream, _) = listener.accept().await.expect("accept");
        stream.set_nodelay(true).expect("nodelay");
        tokio_tungstenite::accept_async(tokio_tungstenite::MaybeTlsStream::Plain(stream))
            .await
            .expect("websocket handshake")
    };
    if kind == "echo" {
        loop {
            tokio::spawn(respond(accept().await));
        }
    }
    let (mut one_out, mut one_in) = accept().await.split();
    let (mut two_out, mut two_in) = accept().await.split();
    let forward = tokio::spawn(async move {
        while let Some(Ok(message)) = one_in.next().await {
            if two_out.send(message).await.is_err() {
                break;
            }
        }
    });
    while let Some(Ok(message)) = two_in.next().await {
        if one_out.send(message).await.is_err() {
            break;
        }
    }
    let _ = forward.await;
}

/// Caller/responder pairs connected once and reused by every concurrent phase.
struct Pairs {
    callers: Vec<(Socket, String)>,
    responders: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Pairs {
    fn drop(&mut self) {
        self.responders.iter().for_each(|r| r.abort());
    }
}

async fn connect_pairs(url: &str, responder_url: &str, pairs: usize) -> Pairs {
    let mut callers = Vec::new();
    let mut responders = Vec::new();
    for i in 0..pairs {
        let (responder, responder_addr) =
            connect(responder_url, &format!("resp-{i}-{}", std::process::id())).await;
        responders.push(tokio::spawn(respond(responder)));
        let (caller, _) = connect(url, &format!("call-{i}-{}", std::process::id())).await;
        callers.push((caller, responder_addr));
    }
    Pairs {
        callers,
        responders,
    }
}

/// Every caller keeps `window` calls in flight for `seconds`; returns (sorted round trips,
/// completed calls per second).
async fn concurrent(pairs: &mut Pairs, window: usize, seconds: u64) -> (Vec<Duration>, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let completed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (socket, target) in pairs.callers.drain(..) {
        let (stop, completed) = (stop.clone(), completed.clone());
        tasks.push(tokio::spawn(async move {
            let (mut sink, mut stream) = socket.split();
            let mut sent_at = std::collections::HashMap::new();
            let mut rtts = Vec::new();
            let mut seq = 0u64;
            for _ in 0..window {
                sent_at.insert(seq, Instant::now());
                sink.send(Message::Binary(call_frame(&target, seq).into()))
                    .await
                    .expect("send");
                seq += 1;
            }
            while !sent_at.is_empty() {
                let Some(Ok(message)) = stream.next().await else {
                    break;
                };
                let Message::Binary(data) = message else {
                    continue;
                };
                let Some(done) = reply_seq(&data) else {
                    continue;
                };
                if let Some(at) = sent_at.remove(&done) {
                    rtts.push(at.elapsed());
                    completed.fetch_add(1, Ordering::Relaxed);
                }
                if !stop.load(Ordering::Relaxed) {
                    sent_at.insert(seq, Instant::now());
                    sink.send(Message::Binary(call_frame(&target, seq).into()))
                        .await
                        .expect("send");
                    seq += 1;
                }
            }
            let socket = sink.reunite(stream).expect("same socket");
            (rtts, socket, target)
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let counted = completed.load(Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut rtts = Vec::new();
    for task in tasks {
        if let Ok(Ok((mut r, socket, target))) =
            tokio::time::timeout(Duration::from_secs(30), task).await
        {
            rtts.append(&mut r);
            pairs.callers.push((socket, target));
        }
    }
    rtts.sort();
    (rtts, (counted as f64 / elapsed) as u64)
}

/// `connections` clients each call the manager's get_rtc_ice_servers back to back for
/// `seconds`; returns (sorted round trips, calls per second, first refusal).
async fn ice_calls(
    url: &str,
    token: &str,
    connections: usize,
    seconds: u64,
) -> (Vec<Duration>, u64, Option<String>) {
    let stop = Arc::new(AtomicBool::new(false));
    let completed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..connections {
        let (mut socket, info) =
            try_connect_as(url, &format!("ice-{i}-{}", std::process::id()), Some(token))
                .await
                .expect("sign in");
        let manager = format!("*/{}", info["manager_id"].as_str().expect("manager_id"));
        let (stop, completed) = (stop.clone(), completed.clone());
        tasks.push(tokio::spawn(async move {
            let mut rtts = Vec::new();
            let mut refusal = None;
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let header = map(vec![
                    ("type", "method".into()),
                    ("from", "bench".into()),
                    ("to", manager.as_str().into()),
                    ("method", "services.default.get_rtc_ice_servers".into()),
                    ("session", format!("s{seq}").into()),
                ]);
                let body = map(vec![
                    ("args", Value::Array(vec![])),
                    ("promise", "*".into()),
                    ("t", 15.into()),
                ]);
                let started = Instant::now();
                socket
                    .send(Message::Binary(frame(&header, &body).into()))
                    .await
                    .expect("send");
                loop {
                    let Some(Ok(Message::Binary(data))) = socket.next().await else {
                        return (rtts, refusal);
                    };
                    let mut reader: &[u8] = &data;
                    let Ok(reply) = rmpv::decode::read_value(&mut reader) else {
                        continue;
                    };
                    let method = field(&reply, "method").unwrap_or_default();
                    if method == format!("s{seq}.resolve") {
                        rtts.push(started.elapsed());
                        completed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    if method == format!("s{seq}.reject") {
                        let body = rmpv::decode::read_value(&mut reader).ok();
                        refusal = refusal.or(body.map(|b| b.to_string()));
                        break;
                    }
                }
                seq += 1;
            }
            (rtts, refusal)
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let counted = completed.load(Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let (mut rtts, mut refusal) = (Vec::new(), None);
    for task in tasks {
        if let Ok(Ok((mut r, e))) = tokio::time::timeout(Duration::from_secs(30), task).await {
            rtts.append(&mut r);
            refusal = refusal.or(e);
        }
    }
    rtts.sort();
    (rtts, (counted as f64 / elapsed) as u64, refusal)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Opens `count` idle connections; returns RSS before, with them open and after they left
/// (KiB), and how many were accepted.
async fn idle_memory(url: &str, pid: u32, count: usize) -> (u64, u64, u64, usize, Option<String>) {
    // A server just started may still be setting up (the demo's certificate): let it settle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss_kib(pid).unwrap_or(0);
    let semaphore = Arc::new(tokio::sync::Semaphore::new(200));
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        let (url, semaphore) = (url.to_string(), semaphore.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = semaphore.acquire().await.expect("semaphore");
            try_connect(&url, &format!("idle-{i}-{}", std::process::id()))
                .await
                .map(|c| c.0)
        }));
    }
    let mut sockets = Vec::with_capacity(count);
    let mut refusal = None;
    for task in tasks {
        match task.await {
            Ok(Ok(socket)) => sockets.push(socket),
            Ok(Err(e)) => refusal = refusal.or(Some(e)),
            Err(e) => refusal = refusal.or(Some(e.to_string())),
        }
    }
    // Let the server settle, then read its memory with every connection still open.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid).unwrap_or(0);
    let accepted = sockets.len();
    drop(sockets);
    // After they leave: the server should give the memory back. Read until it is within 10 %
    // of the start, or for at most 15 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut left = rss_kib(pid).unwrap_or(0);
    while left > before + before / 10 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        left = rss_kib(pid).unwrap_or(0);
    }
    (before, after, left, accepted, refusal)
}

/// CPU ticks (user and system) a process has used.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// A token for the shared workspace of the connect-cost phase, as Hypha mints one, signed
/// with the own server's secret.
fn workspace_token(workspace: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let claims = serde_json::json!({
        "iss": "https://amun.ai/",
        "sub": "bench-user",
        "aud": "https://amun-ai.eu.auth0.com/api/v2/",
        "iat": now,
        "exp": now + 3600,
        "scope": format!("ws:{workspace}#rw"),
        "gty": "client-credentials",
        "https://amun.ai/roles": [],
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(b"bench-secret"),
    )
    .expect("a token")
}

/// Opens `count` connections into the token's workspace, 200 at a time; returns them and the
/// seconds it took.
async fn open_many(url: &str, token: &str, prefix: &str, count: usize) -> (Vec<Socket>, f64) {
    let started = Instant::now();
    let semaphore = Arc::new(tokio::sync::Semaphore::new(200));
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        let (url, token, semaphore) = (url.to_string(), token.to_string(), semaphore.clone());
        let id = format!("{prefix}-{i}");
        tasks.push(tokio::spawn(async move {
            let _permit = semaphore.acquire().await.expect("semaphore");
            try_connect_with(&url, &id, Some(&token), Some(lean_client()))
                .await
                .map(|c| c.0)
        }));
    }
    let mut sockets = Vec::with_capacity(count);
    for task in tasks {
        match task.await {
            Ok(Ok(socket)) => sockets.push(socket),
            Ok(Err(e)) => panic!("a connection was refused: {e}"),
            Err(e) => panic!("{e}"),
        }
    }
    (sockets, started.elapsed().as_secs_f64())
}

/// Server CPU ticks for `count` connects and their disconnects; and connects per second.
async fn connect_round(url: &str, token: &str, pid: u32, prefix: &str, count: usize) -> (u64, f64) {
    let before = cpu_ticks(pid).unwrap_or(0);
    let (sockets, seconds) = open_many(url, token, prefix, count).await;
    drop(sockets);
    // The server handles the closes after the sockets go: wait until its CPU is quiet.
    let mut last = cpu_ticks(pid).unwrap_or(0);
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = cpu_ticks(pid).unwrap_or(0);
        if now == last {
            break;
        }
        last = now;
    }
    (last.saturating_sub(before), count as f64 / seconds)
}

async fn connect_cost(url: &str, pid: u32, held: usize) {
    const ROUND: usize = 1000;
    let token = workspace_token("bench-connect");
    let mut rounds = Vec::new();
    for round in 0..3 {
        rounds.push(connect_round(url, &token, pid, &format!("first-{round}"), ROUND).await);
    }
    let (kept, seconds) = open_many(url, &token, "held", held).await;
    println!(
        "held {} connections in one workspace: opened at {:.0} per second",
        kept.len(),
        held as f64 / seconds
    );
    let mut late = Vec::new();
    for round in 0..3 {
        late.push(connect_round(url, &token, pid, &format!("late-{round}"), ROUND).await);
    }
    let median = |mut values: Vec<(u64, f64)>| {
        values.sort_by_key(|v| v.0);
        values[values.len() / 2]
    };
    let (first_ticks, first_rate) = median(rounds);
    let (late_ticks, late_rate) = median(late);
    println!(
        "server CPU per {ROUND} connects and disconnects, median of 3: {first_ticks} ticks with none held, {late_ticks} ticks with {held} held: ratio {:.2} (goal <= 1.5); {:.0} and {:.0} connects per second",
        late_ticks as f64 / first_ticks.max(1) as f64,
        first_rate,
        late_rate
    );
    drop(kept);
}

/// Starts the release hypha-rtc on `port` and waits until it takes connections.
/// A server process this benchmark started: stopped and reaped when dropped, on a panic too.
struct OwnServer(std::process::Child);

impl OwnServer {
    fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A scratch folder of this benchmark, removed when dropped.
struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn start_server(port: u16, data_dir: &std::path::Path) -> OwnServer {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_hypha-rtc"))
        .args(["--port", &port.to_string(), "--jwt-secret", "bench-secret"])
        // Every client of the benchmark comes from loopback: one address.
        .args(["--max-connections-per-address", "0"])
        .arg("--data-dir")
        .arg(data_dir)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start hypha-rtc");
    let server = OwnServer(child);
    common::wait_listening(port).await;
    server
}

/// Registers a service `echo` for the client at `addr` through the manager; waits for the
/// answer.
async fn register_echo(socket: &mut Socket, manager: &str, addr: &str) -> Result<(), String> {
    let header = map(vec![
        ("type", "method".into()),
        ("from", addr.into()),
        ("to", format!("*/{manager}").into()),
        ("method", "services.default.register_service".into()),
        ("session", "register".into()),
    ]);
    let info = map(vec![
        ("id", format!("{addr}:echo").into()),
        ("name", "echo".into()),
        ("config", map(vec![("visibility", "protected".into())])),
    ]);
    let body = map(vec![
        ("args", Value::Array(vec![info])),
        ("promise", "*".into()),
        ("t", 30.into()),
    ]);
    socket
        .send(Message::Binary(frame(&header, &body).into()))
        .await
        .map_err(|e| e.to_string())?;
    loop {
        match tokio::time::timeout(Duration::from_secs(30), socket.next()).await {
            Ok(Some(Ok(Message::Binary(data)))) => {
                let mut reader: &[u8] = &data;
                let Ok(reply) = rmpv::decode::read_value(&mut reader) else {
                    continue;
                };
                match field(&reply, "method") {
                    Some("register.resolve") => return Ok(()),
                    Some("register.reject") => {
                        let body = rmpv::decode::read_value(&mut reader).ok();
                        return Err(format!("register_service refused: {body:?}"));
                    }
                    _ => continue,
                }
            }
            Ok(Some(Ok(_))) => continue,
            other => return Err(format!("no answer to register_service: {other:?}")),
        }
    }
}

/// One client of the storm: connects and registers (retrying while the server is away),
/// reports it, waits for the server to go, then does it again.
async fn storm_client(
    url: String,
    token: String,
    id: String,
    registered: Arc<AtomicU64>,
    again: Arc<AtomicU64>,
    retries: Arc<AtomicU64>,
) -> Result<Option<Instant>, String> {
    use rand::RngExt;
    let mut done_at = None;
    for round in 0..2 {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut socket = loop {
            match try_connect_as(&url, &id, Some(&token)).await {
                Ok((mut socket, info)) => {
                    let ws = info["workspace"].as_str().unwrap_or_default().to_string();
                    let manager = info["manager_id"].as_str().unwrap_or_default().to_string();
                    match register_echo(&mut socket, &manager, &format!("{ws}/{id}")).await {
                        Ok(()) => break socket,
                        Err(e) if Instant::now() > deadline => return Err(e),
                        Err(_) => {}
                    }
                }
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => {}
            }
            retries.fetch_add(1, Ordering::Relaxed);
            // As the clients do: try again after a short, jittered pause.
            let pause = rand::rng().random_range(100..300);
            tokio::time::sleep(Duration::from_millis(pause)).await;
        };
        if round == 0 {
            registered.fetch_add(1, Ordering::Relaxed);
            // Wait for the server to go away.
            while let Some(Ok(_)) = socket.next().await {}
        } else {
            done_at = Some(Instant::now());
            again.fetch_add(1, Ordering::Relaxed);
            // Hold the connection until the benchmark ends.
            while let Some(Ok(_)) = socket.next().await {}
        }
    }
    Ok(done_at)
}

/// The reconnect storm: `count` clients with a service each, a server restart, and the time
/// until every client has reconnected and registered its service again.
async fn reconnect_storm(count: usize) {
    let port = common::free_port();
    let data_dir = std::env::temp_dir().join(format!("hypha-rtc-storm-{}", std::process::id()));
    let scratch = Scratch(data_dir.clone());
    let url = format!("ws://127.0.0.1:{port}/ws");
    let token = workspace_token("bench-storm");
    let mut server = start_server(port, &data_dir).await;
    let registered = Arc::new(AtomicU64::new(0));
    let again = Arc::new(AtomicU64::new(0));
    let retries = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::with_capacity(count);
    let opening = Instant::now();
    for i in 0..count {
        clients.push(tokio::spawn(storm_client(
            url.clone(),
            token.clone(),
            format!("storm-{i}"),
            registered.clone(),
            again.clone(),
            retries.clone(),
        )));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while (registered.load(Ordering::Relaxed) as usize) < count && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "{} of {count} clients connected and registered a service in {:.1} s ({} retries)",
        registered.load(Ordering::Relaxed),
        opening.elapsed().as_secs_f64(),
        retries.swap(0, Ordering::Relaxed)
    );
    // The restart: a graceful stop, then a new process on the same port and data.
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status();
    let _ = server.0.wait();
    let restarted = Instant::now();
    server = start_server(port, &data_dir).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while (again.load(Ordering::Relaxed) as usize) < count && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all_back = restarted.elapsed().as_secs_f64();
    let back = again.load(Ordering::Relaxed);
    drop(server);
    let mut times = Vec::new();
    let mut errors = Vec::new();
    for client in clients {
        match tokio::time::timeout(Duration::from_secs(30), client).await {
            Ok(Ok(Ok(Some(at)))) => times.push(at.saturating_duration_since(restarted)),
            Ok(Ok(Ok(None))) => {}
            Ok(Ok(Err(e))) => errors.push(e),
            other => errors.push(format!("{other:?}")),
        }
    }
    times.sort();
    println!(
        "after a restart: {back} of {count} clients reconnected and registered again, the last {all_back:.1} s after the restart began (p50 {:.1} s; goal: all within 10 s); {} retries; {} errors{}",
        percentile(&times, 0.5).as_secs_f64(),
        retries.load(Ordering::Relaxed),
        errors.len(),
        errors
            .first()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default()
    );
    drop(scratch);
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let options = Options::parse();
    if let Some(kind) = &options.serve_baseline {
        serve_baseline(kind).await;
        return;
    }
    if let Some(count) = options.reconnect_storm {
        reconnect_storm(count).await;
        return;
    }
    // Declared before the server: dropped after it has stopped.
    let mut scratch = None;
    let mut own_server = None;
    let (url, pid) = match &options.url {
        Some(url) => (url.clone(), options.pid),
        None => {
            let port = common::free_port();
            let data_dir =
                std::env::temp_dir().join(format!("hypha-rtc-bench-{}", std::process::id()));
            scratch = Some(Scratch(data_dir.clone()));
            let server = start_server(port, &data_dir).await;
            let pid = server.id();
            own_server = Some(server);
            (format!("ws://127.0.0.1:{port}/ws"), Some(pid))
        }
    };

    println!("== {} at {url}", options.label);
    if let (Some(held), Some(pid)) = (options.connect_cost, pid) {
        connect_cost(&url, pid, held).await;
        return;
    }
    if let Some(token) = &options.ice_token {
        for connections in [1, 32] {
            let (rtts, per_second, refusal) =
                ice_calls(&url, token, connections, options.seconds).await;
            println!(
                "get_rtc_ice_servers over the websocket RPC, {connections} connection(s) back to back: {per_second} calls/s, p50 {:.0} us, p99 {:.0} us",
                micros(percentile(&rtts, 0.5)),
                micros(percentile(&rtts, 0.99))
            );
            if let Some(refusal) = refusal {
                println!("  refused: {refusal}");
            }
        }
        return;
    }
    // Memory first, on a fresh process, before the load phases leave garbage behind.
    if let (Some(pid), true) = (pid, options.idle > 0) {
        let (before, after, left, accepted, refusal) = idle_memory(&url, pid, options.idle).await;
        println!(
            "idle authenticated connections: {accepted} of {}; server RSS {:.1} MiB before, {:.1} MiB with them: {:.1} KiB per connection (goal <= 8); {:.1} MiB after they left ({:+.0} % of the start; goal within 10 %)",
            options.idle,
            before as f64 / 1024.0,
            after as f64 / 1024.0,
            after.saturating_sub(before) as f64 / accepted.max(1) as f64,
            left as f64 / 1024.0,
            (left as f64 / before.max(1) as f64 - 1.0) * 100.0
        );
        if let Some(refusal) = refusal {
            println!("  some connections were refused: {refusal}");
        }
        // Let the server finish closing them before latency is measured.
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    if options.idle_only {
        return;
    }
    let direct = direct_baseline(options.calls).await;
    let (echoed, relayed) = process_baselines(options.calls).await;
    let responder_url = options.responder_url.clone().unwrap_or_else(|| url.clone());
    if responder_url != url {
        println!("responders connect to {responder_url}");
    }
    let (responder, responder_addr) =
        connect(&responder_url, &format!("seq-resp-{}", std::process::id())).await;
    let responder = tokio::spawn(respond(responder));
    let (mut caller, _) = connect(&url, &format!("seq-call-{}", std::process::id())).await;
    let routed = sequential(&mut caller, &responder_addr, options.calls).await;
    let added50 = micros(percentile(&routed, 0.5)) - micros(percentile(&direct, 0.5));
    let added99 = micros(percentile(&routed, 0.99)) - micros(percentile(&direct, 0.99));
    println!(
        "direct websocket round trip (no server): p50 {:.0} us, p99 {:.0} us",
        micros(percentile(&direct, 0.5)),
        micros(percentile(&direct, 0.99))
    );
    println!(
        "routed call round trip, sequential ({} calls): p50 {:.0} us, p99 {:.0} us; added by the server: p50 {:.0} us, p99 {:.0} us",
        options.calls,
        micros(percentile(&routed, 0.5)),
        micros(percentile(&routed, 0.99)),
        added50,
        added99
    );
    let p50 = |rtts: &[Duration]| micros(percentile(rtts, 0.5));
    let p99 = |rtts: &[Duration]| micros(percentile(rtts, 0.99));
    println!(
        "the same calls through processes of their own (each hop wakes another process, as routing does): echo process p50 {:.0} us, p99 {:.0} us; relay process that forwards and parses nothing, p50 {:.0} us, p99 {:.0} us",
        p50(&echoed),
        p99(&echoed),
        p50(&relayed),
        p99(&relayed)
    );
    // The relay is one process between caller and responder, like one instance.
    let across = if responder_url != url {
        " (the routed call crossed two instances)"
    } else {
        ""
    };
    println!(
        "routed against the bare relay{across}: p50 {:.2}x ({:+.0} us), p99 {:.2}x ({:+.0} us); added by the server, p50: {:.2}x the in-process echo (routed minus it, over it); routed minus the echo process, over it: {:.2}x",
        p50(&routed) / p50(&relayed).max(1.0),
        p50(&routed) - p50(&relayed),
        p99(&routed) / p99(&relayed).max(1.0),
        p99(&routed) - p99(&relayed),
        added50 / p50(&direct).max(1.0),
        (p50(&routed) - p50(&echoed)) / p50(&echoed).max(1.0)
    );
    let mut pairs = connect_pairs(&url, &responder_url, options.pairs).await;
    let (rtts, calls_per_s) = concurrent(&mut pairs, 1, options.seconds).await;
    println!(
        "routed call round trip, {} concurrent pairs: p50 {:.0} us, p99 {:.0} us; {} calls/s = {} routed messages/s",
        options.pairs,
        micros(percentile(&rtts, 0.5)),
        micros(percentile(&rtts, 0.99)),
        calls_per_s,
        calls_per_s * 2
    );
    let (rtts, calls_per_s) = concurrent(&mut pairs, options.window, options.seconds).await;
    println!(
        "routed messages per second, {} pairs x {} calls in flight: {} routed messages/s (call p50 {:.0} us, p99 {:.0} us)",
        options.pairs,
        options.window,
        calls_per_s * 2,
        micros(percentile(&rtts, 0.5)),
        micros(percentile(&rtts, 0.99))
    );
    drop(caller);
    responder.abort();
    drop(own_server);
    drop(scratch);
}
