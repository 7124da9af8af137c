//! Starts the app on port 0 and gives tests a typed handle and a raw protocol client.

#![allow(dead_code)]

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hypha_rtc::App;
use hypha_rtc::config::Settings;
use secrecy::SecretString;
use tokio_tungstenite::tungstenite::Message;

pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A server started by a test: its address, and what tests may look at or arrange.
#[derive(Clone)]
pub struct TestApp {
    pub addr: std::net::SocketAddr,
    state: std::sync::Arc<hypha_rtc::AppState>,
}

impl TestApp {
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// The server's token issuer: to mint tokens as a sign-in would, and to read them back.
    pub fn tokens(&self) -> &hypha_rtc::auth::TokenIssuer {
        self.state.tokens()
    }

    /// Adds an account to the store, as `hypha-rtc user add` does.
    pub async fn add_user(&self, record: &hypha_rtc::store::UserRecord) {
        self.state
            .store()
            .create_user(record)
            .await
            .expect("the user is added");
    }

    /// Disables an account in the store, as `hypha-rtc user disable` does.
    pub async fn disable_user(&self, email: &str) {
        let now = hypha_rtc::auth::now_secs();
        self.state
            .store()
            .disable_user(email, now)
            .await
            .expect("the user is disabled");
    }

    /// Connections refused because their address had too many.
    pub fn refused_per_address(&self) -> u64 {
        self.state.refused_per_address()
    }

    /// Whether `addr` (`workspace/client`) has a live connection here.
    pub fn is_connected(&self, addr: &str) -> bool {
        self.state.is_connected(addr)
    }

    /// Chunked messages the server is watching now.
    pub fn chunked_in_flight(&self) -> usize {
        self.state.chunked_in_flight()
    }

    /// Connections admitted and still open.
    pub fn open_connections(&self) -> usize {
        self.state.open_connections()
    }

    /// The id the server's manager goes by.
    pub fn manager_id(&self) -> &str {
        self.state.manager_id()
    }

    /// The embedded store's database file.
    pub fn database(&self) -> std::path::PathBuf {
        self.state.settings().store.data_dir.join("hypha-rtc.db")
    }
}

pub async fn spawn_app(tune: impl FnOnce(&mut Settings)) -> TestApp {
    let data_dir =
        std::env::temp_dir().join(format!("hypha-rtc-test-{}", hypha_rtc::ids::random_id(10)));
    let mut settings = Settings::default();
    settings.server.port = 0;
    settings.store.data_dir = data_dir;
    settings.server.jwt_secret = Some(SecretString::from("integration-secret".to_string()));
    tune(&mut settings);
    let app = App::build(settings).await.expect("app builds");
    let test_app = TestApp {
        addr: app.addr(),
        state: app.state(),
    };
    tokio::spawn(app.run_until(std::future::pending()));
    test_app
}

/// Connects anonymously as `client_id`; returns the socket and `connection_info`.
pub async fn connect(app: &TestApp, client_id: &str) -> (Socket, serde_json::Value) {
    let (mut socket, _) = tokio_tungstenite::connect_async(app.ws_url())
        .await
        .expect("connects");
    let hello = serde_json::json!({"client_id": client_id, "workspace": null, "token": null});
    socket
        .send(Message::Text(hello.to_string().into()))
        .await
        .expect("sends hello");
    let info = next_text(&mut socket).await;
    assert_eq!(info["type"], "connection_info", "{info}");
    (socket, info)
}

pub async fn next_text(socket: &mut Socket) -> serde_json::Value {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), socket.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return serde_json::from_str(&t).expect("JSON"),
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

/// Waits for the socket to close; returns the close code if a close frame arrived.
pub async fn closed(socket: &mut Socket, within: Duration) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, socket.next()).await {
            Err(_) => panic!("the socket did not close within {within:?}"),
            Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_))) | Ok(None) => return None,
        }
    }
}

/// Polls a condition until it holds or the deadline passes.
pub async fn eventually(within: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connects with the given first message; returns the socket and `connection_info`, or the
/// server's error message.
pub async fn connect_with(
    app: &TestApp,
    hello: serde_json::Value,
) -> Result<(Socket, serde_json::Value), String> {
    let (mut socket, _) = tokio_tungstenite::connect_async(app.ws_url())
        .await
        .expect("connects");
    socket
        .send(Message::Text(hello.to_string().into()))
        .await
        .expect("sends hello");
    let reply = next_text(&mut socket).await;
    match reply["type"].as_str() {
        Some("connection_info") => Ok((socket, reply)),
        _ => Err(reply["message"].as_str().unwrap_or("").to_string()),
    }
}

/// Encodes a frame: a header and an optional body.
pub fn frame(header: &rmpv::Value, body: Option<&rmpv::Value>) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, header).unwrap();
    if let Some(body) = body {
        rmpv::encode::write_value(&mut out, body).unwrap();
    }
    out
}

/// A msgpack map from string keys.
pub fn map(entries: &[(&str, rmpv::Value)]) -> rmpv::Value {
    rmpv::Value::Map(
        entries
            .iter()
            .map(|(k, v)| (rmpv::Value::from(*k), v.clone()))
            .collect(),
    )
}

/// A string field of a msgpack map.
pub fn field<'a>(value: &'a rmpv::Value, key: &str) -> Option<&'a rmpv::Value> {
    value
        .as_map()?
        .iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
}

/// The next binary frame, decoded into its header and body (`Nil` when there is none).
pub async fn next_frame(
    socket: &mut Socket,
    within: Duration,
) -> Option<(rmpv::Value, rmpv::Value)> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, socket.next()).await {
            Ok(Some(Ok(Message::Binary(data)))) => {
                let mut reader: &[u8] = &data;
                let header = rmpv::decode::read_value(&mut reader).unwrap();
                let body = if reader.is_empty() {
                    rmpv::Value::Nil
                } else {
                    rmpv::decode::read_value(&mut reader).unwrap()
                };
                return Some((header, body));
            }
            Ok(Some(Ok(_))) => continue,
            _ => return None,
        }
    }
}

/// Sends a call (promise `*`) and waits for its answer: the resolved value, or the reject's
/// message. Frames that are not the answer are skipped.
pub async fn call(
    socket: &mut Socket,
    to: &str,
    method: &str,
    args: Vec<rmpv::Value>,
) -> Result<rmpv::Value, String> {
    call_with_body(socket, to, method, &[("args", rmpv::Value::Array(args))]).await
}

/// Like [`call`], with extra body fields.
pub async fn call_with_body(
    socket: &mut Socket,
    to: &str,
    method: &str,
    body: &[(&str, rmpv::Value)],
) -> Result<rmpv::Value, String> {
    let session = format!("s{}", hypha_rtc::ids::random_id(10));
    let header = map(&[
        ("type", "method".into()),
        ("to", to.into()),
        ("method", method.into()),
        ("session", session.as_str().into()),
    ]);
    let mut entries = body.to_vec();
    entries.push(("promise", "*".into()));
    entries.push(("t", 30.into()));
    socket
        .send(Message::Binary(frame(&header, Some(&map(&entries))).into()))
        .await
        .expect("sends the call");
    answer(socket, &session).await
}

/// Waits for the answer to `session`.
pub async fn answer(socket: &mut Socket, session: &str) -> Result<rmpv::Value, String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some((header, body)) = next_frame(socket, left).await else {
            panic!("no answer to {session}");
        };
        let method = field(&header, "method")
            .and_then(|m| m.as_str())
            .unwrap_or("");
        let first = field(&body, "args")
            .and_then(|a| a.as_array())
            .and_then(|a| a.first())
            .cloned()
            .unwrap_or(rmpv::Value::Nil);
        if method == format!("{session}.resolve") {
            return Ok(first);
        }
        if method == format!("{session}.reject") {
            let message = field(&first, "_rvalue")
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string();
            return Err(message);
        }
    }
}

/// A plain HTTP/1.1 request over a new connection; returns the status, the headers (names
/// in lower case) and the body.
/// A GET with `token` as the Bearer.
pub async fn get_as(app: &TestApp, path: &str, token: &str) -> (u16, String) {
    let bearer = format!("Bearer {token}");
    let (status, _, body) = http(app, "GET", path, &[("Authorization", &bearer)], b"").await;
    (status, body)
}

pub async fn http(
    app: &TestApp,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<(String, String)>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
        app.addr
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut response))
        .await
        .expect("a response in time")
        .unwrap();
    let text = String::from_utf8_lossy(&response).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    // Chunked bodies: the tests only look for words in them, so the framing can stay.
    (status, headers, body.to_string())
}

/// A header of an [`http`] response.
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}
