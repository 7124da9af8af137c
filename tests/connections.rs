//! Connection lifecycle against the real app: slow consumers, time-outs, routing identity.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use rmpv::Value;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn a_consumer_that_stops_reading_is_disconnected_and_the_sender_goes_on() {
    let app = spawn_app(|s| {
        s.connections.queue = 8;
        s.connections.slow_consumer_timeout = Duration::from_millis(300);
    })
    .await;
    let (mut sender, info) = connect(&app, "fast").await;
    let ws = info["workspace"].as_str().unwrap().to_string();
    // The slow client joins the sender's workspace through a reconnection-free path: same user
    // is not needed, routing is not ACL-checked by workspace.
    let (_slow, slow_info) = connect(&app, "slow").await;
    let target = format!("{}/slow", slow_info["workspace"].as_str().unwrap());
    let payload = Value::Binary(vec![7u8; 64 * 1024]);
    let data = frame(
        &map(&[("type", "event".into()), ("to", target.as_str().into())]),
        Some(&map(&[("data", payload)])),
    );
    // Far more than queue + socket buffers can hold: the slow client must be dropped, and the
    // sender must not be blocked for good.
    for _ in 0..2000 {
        if sender
            .send(Message::Binary(data.clone().into()))
            .await
            .is_err()
        {
            panic!("the sender was disconnected instead of the slow consumer");
        }
        if !app.is_connected(&target) {
            break;
        }
    }
    eventually(
        Duration::from_secs(10),
        "the slow consumer to be disconnected",
        || !app.is_connected(&target),
    )
    .await;
    assert!(app.is_connected(&format!("{ws}/fast")));
    sender
        .send(Message::Text(r#"{"type":"ping"}"#.into()))
        .await
        .unwrap();
    loop {
        let reply = next_text(&mut sender).await;
        if reply["type"] == "pong" {
            break;
        }
    }
}

#[tokio::test]
async fn idle_and_silent_connections_are_closed() {
    let app = spawn_app(|s| {
        s.connections.idle_timeout = Duration::from_millis(300);
        s.connections.ping_interval = Duration::from_millis(100);
        s.connections.handshake_timeout = Duration::from_millis(300);
    })
    .await;
    let (mut idle, _) = connect(&app, "idle").await;
    let code = closed(&mut idle, Duration::from_secs(5)).await;
    assert_eq!(code, Some(1001));
    let (mut mute, _) = tokio_tungstenite::connect_async(app.ws_url())
        .await
        .unwrap();
    let error = next_text(&mut mute).await;
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("no authentication message"),
        "{error}"
    );
    assert_eq!(closed(&mut mute, Duration::from_secs(5)).await, Some(1008));
}

#[tokio::test]
async fn routed_frames_carry_the_server_identity_and_untouched_body() {
    let app = spawn_app(|_| {}).await;
    let (mut a, a_info) = connect(&app, "a").await;
    let (mut b, b_info) = connect(&app, "b").await;
    let b_addr = format!("{}/b", b_info["workspace"].as_str().unwrap());
    let body = map(&[("args", Value::Array(vec![Value::Binary(vec![1, 2, 3])]))]);
    let header = map(&[
        ("type", "method".into()),
        ("to", b_addr.as_str().into()),
        ("from", "forged/x".into()),
        ("user", map(&[("id", "root".into())])),
        ("method", "services.x.y".into()),
    ]);
    a.send(Message::Binary(frame(&header, Some(&body)).into()))
        .await
        .unwrap();
    let received = loop {
        match tokio::time::timeout(Duration::from_secs(5), b.next()).await {
            Ok(Some(Ok(Message::Binary(data)))) => break data,
            Ok(Some(Ok(_))) => continue,
            other => panic!("no frame for b: {other:?}"),
        }
    };
    let mut reader: &[u8] = &received;
    let header = rmpv::decode::read_value(&mut reader).unwrap();
    let get = |k: &str| {
        header
            .as_map()
            .unwrap()
            .iter()
            .find(|(key, _)| key.as_str() == Some(k))
            .map(|(_, v)| v.clone())
    };
    let a_ws = a_info["workspace"].as_str().unwrap();
    assert_eq!(
        get("from").unwrap().as_str(),
        Some(format!("{a_ws}/a").as_str())
    );
    assert_eq!(get("ws").unwrap().as_str(), Some(a_ws));
    let user = get("user").unwrap();
    let user_id = user
        .as_map()
        .unwrap()
        .iter()
        .find(|(k, _)| k.as_str() == Some("id"))
        .unwrap()
        .1
        .clone();
    assert_eq!(user_id.as_str(), a_info["user"]["id"].as_str());
    let mut expected = Vec::new();
    rmpv::encode::write_value(&mut expected, &body).unwrap();
    assert_eq!(
        reader,
        expected.as_slice(),
        "the body must be forwarded byte for byte"
    );
}

#[tokio::test]
async fn large_and_small_frames_arrive_whole_and_in_order() {
    let app = spawn_app(|_| {}).await;
    let (mut a, _) = connect(&app, "a").await;
    let (mut b, b_info) = connect(&app, "b").await;
    let target = format!("{}/b", b_info["workspace"].as_str().unwrap());
    // Larger than any one read, an odd length, and no two neighbouring bytes alike: a frame
    // cut or joined wrongly by the read-ahead would not decode to the same bytes.
    let large: Vec<u8> = (0..1_048_583u32).map(|i| (i % 253) as u8).collect();
    let sizes = [large.len(), 3, 70_000, 1];
    for size in sizes {
        let data = frame(
            &map(&[("type", "event".into()), ("to", target.as_str().into())]),
            Some(&map(&[("data", Value::Binary(large[..size].to_vec()))])),
        );
        a.send(Message::Binary(data.into())).await.unwrap();
    }
    for size in sizes {
        let (_, body) = next_frame(&mut b, Duration::from_secs(10))
            .await
            .expect("the frame");
        let got = field(&body, "data")
            .and_then(|d| d.as_slice())
            .expect("data");
        assert_eq!(got.len(), size);
        assert_eq!(got, &large[..size]);
    }
}

#[tokio::test]
async fn requests_that_cannot_become_websockets_are_told_why() {
    let app = spawn_app(|_| {}).await;
    let (status, _, body) = http(&app, "GET", "/ws", &[], b"").await;
    assert_eq!(status, 400);
    assert!(
        body.contains("Connection header must include 'upgrade'"),
        "{body}"
    );
    let upgrade = [("Connection", "Upgrade"), ("Upgrade", "websocket")];
    let (status, headers, body) = http(
        &app,
        "GET",
        "/ws",
        &[
            upgrade[0],
            upgrade[1],
            ("Sec-WebSocket-Version", "8"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
        b"",
    )
    .await;
    assert_eq!(status, 426);
    assert_eq!(header(&headers, "sec-websocket-version"), Some("13"));
    assert!(body.contains("version 13"), "{body}");
    let (status, _, body) = http(
        &app,
        "GET",
        "/ws",
        &[upgrade[0], upgrade[1], ("Sec-WebSocket-Version", "13")],
        b"",
    )
    .await;
    assert_eq!(status, 400);
    assert!(body.contains("Sec-WebSocket-Key"), "{body}");
    // The server is unharmed: a real client still connects.
    let (_client, info) = connect(&app, "after").await;
    assert_eq!(info["type"], "connection_info");
}
