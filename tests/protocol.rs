//! The wire protocol spoken by hand, where no real client is needed: bad frames and first
//! messages, stolen reconnection tokens and broadcasts. Each asserts what the server
//! answers and that the other clients go on.

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use rmpv::Value;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

async fn send_binary(socket: &mut Socket, data: Vec<u8>) {
    socket
        .send(Message::Binary(data.into()))
        .await
        .expect("sends");
}

async fn send_text(socket: &mut Socket, text: &str) {
    socket
        .send(Message::Text(text.to_string().into()))
        .await
        .expect("sends");
}

/// A socket that has sent nothing yet.
async fn open(app: &TestApp) -> Socket {
    tokio_tungstenite::connect_async(app.ws_url())
        .await
        .expect("connects")
        .0
}

fn token_of(app: &TestApp, id: &str) -> String {
    let user =
        hypha_rtc::auth::UserInfo::new(hypha_rtc::ids::UserId::parse(id).unwrap(), vec![], None);
    app.tokens().issue(&user, 600)
}

/// A witness client echoes through the manager: the server still serves others.
async fn still_serves(app: &TestApp) {
    let (mut witness, info) = connect(app, "witness").await;
    let manager = format!("*/{}", info["manager_id"].as_str().unwrap());
    let echoed = call(
        &mut witness,
        &manager,
        "services.default.echo",
        vec!["still here".into()],
    )
    .await;
    assert_eq!(echoed, Ok(Value::from("still here")));
}

#[tokio::test]
async fn bad_frames_get_errors_and_others_go_on() {
    let app = spawn_app(|_| {}).await;
    let (mut raw, _) = connect(&app, "fuzzer").await;
    let cases: [(Vec<u8>, &str); 4] = [
        (vec![0x92, 0x01], "not valid msgpack"),
        (
            frame(&Value::Array(vec![1.into(), 2.into(), 3.into()]), None),
            "must be a msgpack map",
        ),
        (frame(&map(&[("type", "method".into())]), None), "'to'"),
        (vec![0xc1], "msgpack"),
    ];
    for (bad, expected) in cases {
        send_binary(&mut raw, bad).await;
        let error = next_text(&mut raw).await;
        assert_eq!(error["type"], "error", "{error}");
        assert!(
            error["message"].as_str().unwrap().contains(expected),
            "{expected}: {error}"
        );
    }
    send_text(&mut raw, r#"{"type": "ping"}"#).await;
    assert_eq!(next_text(&mut raw).await, json!({"type": "pong"}));
    send_text(&mut raw, r#"{"type": "refresh_token"}"#).await;
    let refreshed = next_text(&mut raw).await;
    assert_eq!(refreshed["type"], "reconnection_token", "{refreshed}");
    assert!(!refreshed["reconnection_token"].as_str().unwrap().is_empty());

    // Above the 2 MiB frame limit: said, then closed with 1009.
    send_binary(&mut raw, vec![0x80; 2 * 1024 * 1024 + 1]).await;
    let error = next_text(&mut raw).await;
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("exceeds the limit"),
        "{error}"
    );
    assert_eq!(closed(&mut raw, Duration::from_secs(5)).await, Some(1009));

    let mut bad_utf8 = open(&app).await;
    send_binary(&mut bad_utf8, b"\xff\xfe{not utf8".to_vec()).await;
    let error = next_text(&mut bad_utf8).await;
    assert!(
        error["message"].as_str().unwrap().contains("UTF-8"),
        "{error}"
    );
    let mut not_json = open(&app).await;
    send_text(&mut not_json, "{{{").await;
    let error = next_text(&mut not_json).await;
    assert!(
        error["message"].as_str().unwrap().contains("JSON"),
        "{error}"
    );
    still_serves(&app).await;
}

#[tokio::test]
async fn a_reconnection_token_is_bound_to_its_client_and_manager_ids_are_reserved() {
    let app = spawn_app(|_| {}).await;
    let frank = token_of(&app, "frank");
    let (_orig, info) = connect_with(
        &app,
        json!({"client_id": "orig", "token": frank, "workspace": null}),
    )
    .await
    .unwrap();
    let stolen = info["reconnection_token"].as_str().unwrap().to_string();
    let refused = connect_with(
        &app,
        json!({"client_id": "thief", "reconnection_token": stolen}),
    )
    .await
    .err()
    .unwrap_or_default();
    assert!(
        refused.contains("reconnection token is for client orig, not thief"),
        "{refused}"
    );
    let reserved = connect_with(&app, json!({"client_id": "manager-fake"}))
        .await
        .err()
        .unwrap_or_default();
    assert!(reserved.contains("reserved"), "{reserved}");
}

#[tokio::test]
async fn a_broadcast_reaches_the_workspace_only() {
    let app = spawn_app(|_| {}).await;
    let judy = token_of(&app, "judy");
    let join = |client: &str| json!({"client_id": client, "token": judy, "workspace": null});
    let (mut sender, _) = connect_with(&app, join("caster")).await.unwrap();
    let (mut listener, _) = connect_with(&app, join("listener")).await.unwrap();
    let (mut outsider, _) = connect(&app, "outsider").await;
    let news = map(&[
        ("type", "news".into()),
        ("to", "*".into()),
        ("data", "hello all".into()),
    ]);
    send_binary(&mut sender, frame(&news, None)).await;
    let (header, _) = next_frame(&mut listener, Duration::from_secs(5))
        .await
        .expect("the listener hears the broadcast");
    assert_eq!(field(&header, "type"), Some(&Value::from("news")));
    assert_eq!(
        field(&header, "from"),
        Some(&Value::from("ws-user-judy/caster"))
    );
    assert_eq!(field(&header, "to"), Some(&Value::from("ws-user-judy/*")));
    assert!(
        next_frame(&mut outsider, Duration::from_millis(500))
            .await
            .is_none(),
        "a client of another workspace heard the broadcast"
    );
    // Broadcasting into another workspace is refused, in words.
    let intrusion = map(&[("type", "news".into()), ("to", "ws-user-judy/*".into())]);
    send_binary(&mut outsider, frame(&intrusion, None)).await;
    let error = next_text(&mut outsider).await;
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("broadcast to workspace ws-user-judy is not allowed"),
        "{error}"
    );
}
