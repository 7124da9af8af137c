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

pub struct TestApp {
    pub addr: std::net::SocketAddr,
    pub state: std::sync::Arc<hypha_rtc::AppState>,
}

impl TestApp {
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }
}

pub async fn spawn_app(tune: impl FnOnce(&mut Settings)) -> TestApp {
    let data_dir =
        std::env::temp_dir().join(format!("hypha-rtc-test-{}", hypha_rtc::auth::random_id(10)));
    let mut settings = Settings {
        port: 0,
        data_dir,
        jwt_secret: Some(SecretString::from("integration-secret".to_string())),
        ..Settings::default()
    };
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
