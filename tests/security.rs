//! Attacks on the server, each driven as a hostile client would, each asserting that the
//! attacker gains nothing and that a normal client still works afterwards.

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use hypha_rtc::auth::UserInfo;
use hypha_rtc::ids::UserId;
use rmpv::Value;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "integration-secret";

fn user(id: &str, roles: &[&str]) -> UserInfo {
    UserInfo::new(
        UserId::parse(id).unwrap(),
        roles.iter().map(|r| r.to_string()).collect(),
        None,
    )
}

fn token(app: &TestApp, id: &str, roles: &[&str], expires_in: i64) -> String {
    app.tokens().issue(&user(id, roles), expires_in)
}

/// A token with claims written by hand (as a third party holding the secret would).
fn raw_token(claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// TURN settings for a coturn that is never probed (the tests ask with test_connectivity off).
fn turn_settings(rate_limit: u32) -> hypha_rtc::turn::TurnSettings {
    let address = hypha_rtc::turn::ice::HostPort::parse("127.0.0.1:9").unwrap();
    hypha_rtc::turn::TurnSettings {
        coturn: Some(hypha_rtc::turn::CoturnSettings {
            secret: secrecy::SecretString::from("coturn".to_string()),
            internal: address.clone(),
            public: vec![address],
            tls_port: None,
        }),
        static_servers: vec![],
        max_ttl: 3600,
        rate_limit,
        audit_required: true,
    }
}

fn now() -> i64 {
    hypha_rtc::auth::now_secs()
}

fn hello(client: &str, token: Option<&str>, workspace: Option<&str>) -> serde_json::Value {
    json!({"client_id": client, "workspace": workspace, "token": token, "reconnection_token": null})
}

fn manager(info: &serde_json::Value) -> String {
    format!("*/{}", info["manager_id"].as_str().unwrap())
}

async fn manager_call(
    socket: &mut Socket,
    info: &serde_json::Value,
    function: &str,
    args: Vec<Value>,
) -> Result<Value, String> {
    call(
        socket,
        &manager(info),
        &format!("services.default.{function}"),
        args,
    )
    .await
}

/// Waits for the server to close the socket; returns the close reason.
async fn close_reason(socket: &mut Socket, within: Duration) -> String {
    use futures_util::StreamExt;
    let deadline = tokio::time::Instant::now() + within;
    let mut said = String::new();
    loop {
        match tokio::time::timeout_at(deadline, socket.next()).await {
            Err(_) => panic!("the connection was not closed within {within:?}"),
            Ok(Some(Ok(Message::Text(text)))) => said.push_str(&text),
            Ok(Some(Ok(Message::Close(frame)))) => {
                return format!(
                    "{said} {}",
                    frame.map(|f| f.reason.to_string()).unwrap_or_default()
                );
            }
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_))) | Ok(None) => return said,
        }
    }
}

async fn still_works(app: &TestApp) {
    let (mut witness, info) = connect(app, "witness").await;
    let echoed = manager_call(&mut witness, &info, "echo", vec!["alive".into()]).await;
    assert_eq!(echoed, Ok(Value::from("alive")));
}

#[tokio::test]
async fn scope_injection_through_generate_token_is_refused() {
    let app = spawn_app(|_| {}).await;
    let alice = token(&app, "alice", &[], 3600);
    let (mut socket, info) = connect_with(&app, hello("a1", Some(&alice), None))
        .await
        .unwrap();
    let injected = "x wid:ws-user-bob ws:ws-user-bob#a ws:public#a";
    let attempts = [
        map(&[("client_id", injected.into())]),
        map(&[("workspace", "ws-user-bob".into())]),
        map(&[("workspace", "ws-user-bob ws:public#a".into())]),
        map(&[("permission", "admin ws:public".into())]),
        map(&[("extra_scopes", Value::Array(vec!["ws:public#a".into()]))]),
        map(&[("extra_scopes", Value::Array(vec!["file:download".into()]))]),
        map(&[("expires_in", (400 * 24 * 3600).into())]),
        map(&[("expires_in", (-5).into())]),
        map(&[("email", "root@example.org".into())]),
        map(&[("scope", "ws:public#a".into())]),
        map(&[("client_id", "manager-x".into())]),
    ];
    for config in attempts {
        let refused =
            manager_call(&mut socket, &info, "generate_token", vec![config.clone()]).await;
        assert!(refused.is_err(), "{config} was accepted");
        let message = refused.unwrap_err();
        assert!(
            !message.is_empty() && !message.contains("Error("),
            "{message}"
        );
    }
    // What a valid request gives is exactly what was asked, within what alice holds: a
    // longer life than her own token's is cut to hers.
    let minted = manager_call(
        &mut socket,
        &info,
        "generate_token",
        vec![map(&[
            ("client_id", "cam-1".into()),
            ("permission", "read_write".into()),
            ("expires_in", 7200.into()),
        ])],
    )
    .await
    .unwrap();
    let child = app.tokens().parse(minted.as_str().unwrap()).unwrap();
    let parent = app.tokens().parse(&alice).unwrap();
    assert_eq!(
        child.scope.to_claim(),
        "ws:ws-user-alice#rw wid:ws-user-alice cid:cam-1"
    );
    assert_eq!(child.account().as_str(), "alice");
    assert!(child.roles.is_empty());
    let (child_ref, parent_ref) = (child.token.unwrap(), parent.token.unwrap());
    assert!(child_ref.expires_at <= parent_ref.expires_at);
    assert!(child_ref.lineage.contains(&parent_ref.id));
    // The child cannot reach bob's workspace, nor register anything in public.
    let bad = connect_with(&app, hello("cam-1", minted.as_str(), Some("ws-user-bob"))).await;
    assert!(bad.unwrap_err().contains("bound to workspace"));
    // A token bound to one client id (an admin's here, so that it may derive at all) derives
    // only tokens bound to that id: none for another client, and one asked without a client
    // id is bound to it all the same.
    let bound = manager_call(
        &mut socket,
        &info,
        "generate_token",
        vec![map(&[
            ("client_id", "cam-9".into()),
            ("permission", "admin".into()),
        ])],
    )
    .await
    .unwrap();
    let (mut camera, camera_info) = connect_with(&app, hello("cam-9", bound.as_str(), None))
        .await
        .unwrap();
    let other = map(&[("client_id", "cam-2".into())]);
    let refused = manager_call(&mut camera, &camera_info, "generate_token", vec![other]).await;
    let refused = refused.unwrap_err();
    assert!(refused.contains("bound to client cam-9"), "{refused}");
    let derived = manager_call(&mut camera, &camera_info, "generate_token", vec![map(&[])])
        .await
        .unwrap();
    let derived = app.tokens().parse(derived.as_str().unwrap()).unwrap();
    assert_eq!(
        derived.scope.client.as_ref().map(|c| c.as_str()),
        Some("cam-9")
    );
    // A token restricted to one purpose (refused on websockets) derives, over HTTP, only
    // tokens restricted alike.
    let download_only = raw_token(json!({
        "iss": "https://amun.ai/", "aud": "https://amun-ai.eu.auth0.com/api/v2/",
        "sub": "eve", "exp": now() + 600, "scope": "ws:ws-user-eve#a file:download",
    }));
    let (status, _, body) = http(
        &app,
        "POST",
        "/ws-user-eve/services/ws/generate_token",
        &[
            ("Authorization", &format!("Bearer {download_only}")),
            ("Content-Type", "application/json"),
        ],
        br#"{"config": {"permission": "admin"}}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let minted: String = serde_json::from_str(&body).unwrap();
    let child = app.tokens().parse(&minted).unwrap();
    assert!(
        child.scope.to_claim().contains("file:download"),
        "{}",
        child.scope.to_claim()
    );
    let refused = connect_with(&app, hello("eve-1", Some(&minted), None)).await;
    assert!(refused.is_err());
    still_works(&app).await;
}

#[tokio::test]
async fn only_an_admin_of_public_registers_there_and_never_over_the_server() {
    let app = spawn_app(|_| {}).await;
    let service = |name: &str| {
        map(&[
            ("id", name.into()),
            ("config", map(&[("visibility", "public".into())])),
        ])
    };
    // Read-write on public is not enough.
    let mut writer = user("wendy", &[]);
    writer.scope.workspaces.insert(
        hypha_rtc::ids::WorkspaceId::parse("public").unwrap(),
        hypha_rtc::auth::Permission::ReadWrite,
    );
    let writer = app.tokens().issue(&writer, 600);
    let (mut w, info) = connect_with(&app, hello("fake", Some(&writer), Some("public")))
        .await
        .unwrap();
    let refused = manager_call(&mut w, &info, "register_service", vec![service("helper")]).await;
    assert!(refused.unwrap_err().contains("admin access is required"));
    // An explicit admin of public registers, but never under the server's own names.
    let mut admin = user("pat", &[]);
    admin.scope.workspaces.insert(
        hypha_rtc::ids::WorkspaceId::parse("public").unwrap(),
        hypha_rtc::auth::Permission::Admin,
    );
    let admin = app.tokens().issue(&admin, 600);
    let (mut a, info) = connect_with(&app, hello("pub", Some(&admin), Some("public")))
        .await
        .unwrap();
    for reserved in [
        "coturn",
        "hypha-login",
        "video-producer",
        "default",
        "built-in",
    ] {
        let refused =
            manager_call(&mut a, &info, "register_service", vec![service(reserved)]).await;
        assert!(
            refused.unwrap_err().contains("belongs to the server"),
            "{reserved}"
        );
    }
    manager_call(&mut a, &info, "register_service", vec![service("helper")])
        .await
        .unwrap();
    // Anonymous callers always reach the server's own services.
    let (mut anon, anon_info) = connect(&app, "anon").await;
    for _ in 0..10 {
        let found = manager_call(
            &mut anon,
            &anon_info,
            "get_service_info",
            vec!["public/coturn".into()],
        )
        .await
        .unwrap();
        let id = field(&found, "id")
            .and_then(Value::as_str)
            .unwrap()
            .to_string();
        assert!(id.contains(app.manager_id()), "{id}");
    }
    still_works(&app).await;
}

#[tokio::test]
async fn revoking_a_token_reaches_connections_reconnections_and_children() {
    let app = spawn_app(|_| {}).await;
    let alice = token(&app, "alice", &[], 3600);
    let (mut live, info) = connect_with(&app, hello("live", Some(&alice), None))
        .await
        .unwrap();
    let reconnection = info["reconnection_token"].as_str().unwrap().to_string();
    let child = manager_call(&mut live, &info, "generate_token", vec![map(&[])])
        .await
        .unwrap();
    let child = child.as_str().unwrap().to_string();
    let (mut child_socket, _) = connect_with(&app, hello("kid", Some(&child), None))
        .await
        .unwrap();
    let (mut other, _) = connect_with(&app, hello("other", Some(&alice), None))
        .await
        .unwrap();
    // An administrator revokes alice's token.
    let admin = token(&app, "root-admin", &["admin"], 600);
    let (mut ops, ops_info) = connect_with(&app, hello("ops", Some(&admin), None))
        .await
        .unwrap();
    manager_call(
        &mut ops,
        &ops_info,
        "revoke_token",
        vec![alice.as_str().into()],
    )
    .await
    .unwrap();
    for socket in [&mut live, &mut child_socket, &mut other] {
        let reason = close_reason(socket, Duration::from_secs(5)).await;
        assert!(reason.contains("revoked"), "{reason}");
    }
    let resumed = json!({"client_id": "live", "workspace": null, "token": null, "reconnection_token": reconnection});
    assert!(connect_with(&app, resumed).await.is_err());
    assert!(
        connect_with(&app, hello("kid", Some(&child), None))
            .await
            .unwrap_err()
            .contains("revoked")
    );
    let (status, _, body) = http(
        &app,
        "GET",
        "/ws-user-alice/services/ws/check_status",
        &[("Authorization", &format!("Bearer {child}"))],
        b"",
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("revoked"), "{body}");
    still_works(&app).await;
}

#[tokio::test]
async fn reconnection_tokens_only_reconnect_and_never_outlive_their_token() {
    let app = spawn_app(|_| {}).await;
    let alice = token(&app, "alice", &[], 3600);
    let (mut socket, info) = connect_with(&app, hello("c1", Some(&alice), None))
        .await
        .unwrap();
    let reconnection = info["reconnection_token"].as_str().unwrap().to_string();
    let life = info["reconnection_token_life_time"].as_i64().unwrap();
    assert!(life <= 3600, "{life}");
    let verified = app.tokens().verify(&reconnection).unwrap();
    let parent = app.tokens().parse(&alice).unwrap();
    assert!(verified.token.unwrap().expires_at <= parent.token.unwrap().expires_at);
    // Refreshing does not extend it either.
    socket
        .send(Message::Text(r#"{"type":"refresh_token"}"#.into()))
        .await
        .unwrap();
    let refreshed = loop {
        let reply = next_text(&mut socket).await;
        if reply["type"] == "reconnection_token" {
            break reply["reconnection_token"].as_str().unwrap().to_string();
        }
    };
    assert!(app.tokens().verify(&refreshed).unwrap().expires_at <= parent.expires_at);
    // Not a Bearer, not a sign-in token.
    let (status, _, body) = http(
        &app,
        "GET",
        "/ws-user-alice/services/ws/check_status",
        &[("Authorization", &format!("Bearer {reconnection}"))],
        b"",
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("reconnection token"), "{body}");
    let as_token = connect_with(&app, hello("c1", Some(&reconnection), None)).await;
    assert!(as_token.unwrap_err().contains("reconnection token"));
    // It reconnects its own client; the resumed session cannot mint.
    drop(socket);
    let resumed = json!({"client_id": "c1", "workspace": null, "token": null, "reconnection_token": reconnection});
    let (mut back, back_info) = connect_with(&app, resumed).await.unwrap();
    assert_eq!(back_info["workspace"], "ws-user-alice");
    let minted = manager_call(&mut back, &back_info, "generate_token", vec![map(&[])]).await;
    assert!(minted.unwrap_err().contains("reconnection token"));
    // With the original token sent along, as the clients do, the session can mint again.
    let both = json!({"client_id": "c1", "workspace": null, "token": alice, "reconnection_token": reconnection});
    let (mut full, full_info) = connect_with(&app, both).await.unwrap();
    assert!(
        manager_call(&mut full, &full_info, "generate_token", vec![map(&[])])
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn a_disabled_account_loses_its_connections_and_its_children() {
    let app = spawn_app(|_| {}).await;
    let record = hypha_rtc::store::UserRecord {
        id: "udan".into(),
        email: "dan@example.org".into(),
        password_hash: "x".into(),
        roles: vec![],
        created_at: now(),
        disabled_at: None,
    };
    app.add_user(&record).await;
    let dan = token(&app, "udan", &[], 3600);
    let (mut parent, info) = connect_with(&app, hello("p", Some(&dan), None))
        .await
        .unwrap();
    let child = manager_call(
        &mut parent,
        &info,
        "generate_token",
        vec![map(&[("client_id", "kid".into())])],
    )
    .await
    .unwrap();
    let child = child.as_str().unwrap().to_string();
    let (mut kid, _) = connect_with(&app, hello("kid", Some(&child), None))
        .await
        .unwrap();
    app.disable_user("dan@example.org").await;
    for socket in [&mut parent, &mut kid] {
        let reason = close_reason(socket, Duration::from_secs(10)).await;
        assert!(reason.contains("disabled"), "{reason}");
    }
    let again = connect_with(&app, hello("kid", Some(&child), None)).await;
    assert!(again.unwrap_err().contains("disabled"));
    let (status, _, _) = http(
        &app,
        "GET",
        "/ws-user-udan/services/ws/check_status",
        &[("Authorization", &format!("Bearer {child}"))],
        b"",
    )
    .await;
    assert_eq!(status, 401);
    still_works(&app).await;
}

#[tokio::test]
async fn amplifying_messages_are_refused_before_they_are_decoded() {
    let app = spawn_app(|_| {}).await;
    let (mut anon, info) = connect(&app, "anon").await;
    let to = manager(&info);
    let cache = |f: &str| format!("services.built-in.message_cache.{f}");
    // A call whose body is an array of two million nils: 2 MB sent, far more decoded.
    let header = rmpv::encode::write_value;
    let mut message = Vec::new();
    header(
        &mut message,
        &map(&[
            ("type", "method".into()),
            ("to", to.as_str().into()),
            ("method", "services.default.echo".into()),
        ]),
    )
    .unwrap();
    message.extend_from_slice(&[
        0x81, 0xa4, b'a', b'r', b'g', b's', 0x91, 0xdd, 0x00, 0x1e, 0x84, 0x80,
    ]);
    message.extend(std::iter::repeat_n(0xc0, 2_000_000));
    call(&mut anon, &to, &cache("create"), vec!["k".into()])
        .await
        .unwrap();
    for (i, chunk) in message.chunks(256 * 1024).enumerate() {
        call(
            &mut anon,
            &to,
            &cache("set"),
            vec!["k".into(), (i as u64).into(), Value::Binary(chunk.to_vec())],
        )
        .await
        .unwrap();
    }
    call(&mut anon, &to, &cache("process"), vec!["k".into()])
        .await
        .unwrap();
    // The assembled call is refused without an answer of its own (it asked for none); the
    // connection and the server go on.
    assert_eq!(
        manager_call(&mut anon, &info, "echo", vec![1.into()]).await,
        Ok(Value::from(1))
    );
    // An anonymous client may not park more than its share.
    call(&mut anon, &to, &cache("create"), vec!["big".into()])
        .await
        .unwrap();
    let mut refused = None;
    for i in 0..80u64 {
        let chunk = Value::Binary(vec![0; 256 * 1024]);
        if let Err(e) = call(
            &mut anon,
            &to,
            &cache("set"),
            vec!["big".into(), i.into(), chunk],
        )
        .await
        {
            refused = Some((i, e));
            break;
        }
    }
    let (at, error) = refused.expect("the cache limit bites");
    assert!(at * 256 * 1024 <= 16 * 1024 * 1024, "{at}");
    assert!(error.contains("limit"), "{error}");
    still_works(&app).await;
}

#[tokio::test]
async fn bodies_cannot_name_the_sender_and_headers_cannot_carry_a_context() {
    let app = spawn_app(|_| {}).await;
    let (mut mallory, _) = connect(&app, "mallory").await;
    let (mut alice, alice_info) = connect(&app, "alice").await;
    let target = format!("{}/alice", alice_info["workspace"].as_str().unwrap());
    for key in ["from", "ws", "user", "ctx", "to"] {
        let forged = call_with_body(
            &mut mallory,
            &target,
            "services.vault.open",
            &[
                ("args", Value::Array(vec![])),
                (key, "ws-user-alice/x".into()),
            ],
        )
        .await;
        let error = forged.unwrap_err();
        assert!(error.contains(&format!("\"{key}\"")), "{error}");
    }
    assert!(
        next_frame(&mut alice, Duration::from_millis(300))
            .await
            .is_none(),
        "a forged frame was delivered"
    );
    // A context in the header is dropped on the way.
    let header = map(&[
        ("type", "method".into()),
        ("to", target.as_str().into()),
        ("method", "services.vault.open".into()),
        ("ctx", map(&[("user", map(&[("id", "root".into())]))])),
    ]);
    mallory
        .send(Message::Binary(
            frame(&header, Some(&map(&[("args", Value::Array(vec![]))]))).into(),
        ))
        .await
        .unwrap();
    let (delivered, _) = next_frame(&mut alice, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(field(&delivered, "ctx").is_none());
    let from = field(&delivered, "from").and_then(Value::as_str).unwrap();
    assert!(from.ends_with("/mallory"), "{from}");
}

#[tokio::test]
async fn clients_cannot_send_the_servers_peer_not_found_notice() {
    let app = spawn_app(|_| {}).await;
    let (mut mallory, _) = connect(&app, "mallory").await;
    let (mut alice, alice_info) = connect(&app, "alice").await;
    let target = format!("{}/alice", alice_info["workspace"].as_str().unwrap());
    // A notice would make alice drop every call to the peer it names (`peer_id`).
    let forged = map(&[
        ("type", "peer_not_found".into()),
        ("to", target.as_str().into()),
        ("session", "s1".into()),
        ("peer_id", "ws-user-bob/bob".into()),
        ("error", "gone".into()),
    ]);
    mallory
        .send(Message::Binary(frame(&forged, None).into()))
        .await
        .unwrap();
    let error = next_text(&mut mallory).await;
    assert_eq!(error["type"], "error", "{error}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("\"peer_not_found\""),
        "{error}"
    );
    // Behind an ordinary `type`: the JS client reads the last of repeated keys.
    let mut repeated = vec![0x86];
    for (key, value) in [
        ("type", "method"),
        ("to", target.as_str()),
        ("session", "s2"),
        ("peer_id", "ws-user-bob/bob"),
        ("error", "gone"),
        ("type", "peer_not_found"),
    ] {
        rmp::encode::write_str(&mut repeated, key).unwrap();
        rmp::encode::write_str(&mut repeated, value).unwrap();
    }
    mallory
        .send(Message::Binary(repeated.into()))
        .await
        .unwrap();
    let error = next_text(&mut mallory).await;
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("\"type\" twice"),
        "{error}"
    );
    // In the body, which the clients merge over the header.
    let refused = call_with_body(
        &mut mallory,
        &target,
        "services.vault.open",
        &[
            ("args", Value::Array(vec![])),
            ("type", "peer_not_found".into()),
        ],
    )
    .await;
    let error = refused.unwrap_err();
    assert!(error.contains("\"peer_not_found\""), "{error}");
    assert!(
        next_frame(&mut alice, Duration::from_millis(300))
            .await
            .is_none(),
        "a forged notice was delivered"
    );
    // Any other type in the body is the client's business.
    let (mut bob, _) = connect(&app, "bob").await;
    let delivered = map(&[
        ("type", "method".into()),
        ("to", target.as_str().into()),
        ("method", "services.x.f".into()),
    ]);
    bob.send(Message::Binary(
        frame(&delivered, Some(&map(&[("type", "method".into())]))).into(),
    ))
    .await
    .unwrap();
    assert!(
        next_frame(&mut alice, Duration::from_secs(5))
            .await
            .is_some(),
        "a frame with a body type of its own was not delivered"
    );
}

/// A frame that `mallory` sends is refused with an error that says `expected`, and `alice`
/// gets nothing.
async fn refused_frame(mallory: &mut Socket, alice: &mut Socket, data: Vec<u8>, expected: &str) {
    mallory.send(Message::Binary(data.into())).await.unwrap();
    let error = next_text(mallory).await;
    assert_eq!(error["type"], "error", "{error}");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains(expected), "{message} / {expected}");
    assert!(
        next_frame(alice, Duration::from_millis(200))
            .await
            .is_none(),
        "delivered: {expected}"
    );
}

/// The next frame `receiver` gets is the manager's call to remove the chunked message it
/// holds under a key starting with `key` (one the server forgot unprocessed); no answer is
/// asked for.
async fn told_to_remove(receiver: &mut Socket, key: &str) {
    let (removal, body) = next_frame(receiver, Duration::from_secs(5))
        .await
        .expect("the receiver is told to remove the message");
    assert_removal(&removal, &body, key);
}

/// `removal` and `body` are the manager's call to remove the message under `key...`.
fn assert_removal(removal: &Value, body: &Value, key: &str) {
    assert_eq!(
        field(removal, "method").and_then(Value::as_str),
        Some("services.built-in.message_cache.remove")
    );
    let from = field(removal, "from").and_then(Value::as_str).unwrap();
    assert!(from.starts_with("*/manager-"), "{from}");
    let args = field(body, "args").and_then(Value::as_array).unwrap();
    let removed = args[0].as_str().unwrap();
    assert!(removed.starts_with(key), "{removed}");
    assert!(field(body, "promise").is_none());
}

#[tokio::test]
async fn frames_cannot_reach_past_what_their_receiver_offers() {
    let app = spawn_app(|s| s.connections.method_timeout = Duration::from_secs(2)).await;
    let (mut mallory, _) = connect(&app, "mallory").await;
    let (mut alice, alice_info) = connect(&app, "alice").await;
    let ws = alice_info["workspace"].as_str().unwrap().to_string();
    let target = format!("{ws}/alice");
    let header = |entries: &[(&str, &str)]| {
        let mut all = vec![("to", target.as_str())];
        all.extend_from_slice(entries);
        let mut data = Vec::new();
        rmp::encode::write_map_len(&mut data, all.len() as u32).unwrap();
        for (key, value) in all {
            rmp::encode::write_str(&mut data, key).unwrap();
            rmp::encode::write_str(&mut data, value).unwrap();
        }
        data
    };
    // A method path into the receiver's internals: the Python client looks each segment up
    // with getattr (a callback's `__globals__` reaches `os.system`), the JavaScript client
    // with [] (a function's `constructor` is `Function`).
    for method in [
        "s1.resolve.__globals__.os.system",
        "s1.resolve.constructor",
        "services.built-in.ping.__self__._process_message",
    ] {
        let data = header(&[("type", "method"), ("method", method)]);
        refused_frame(
            &mut mallory,
            &mut alice,
            data,
            "not a function any client offers",
        )
        .await;
    }
    // The method read one way here and another by the client: repeated, or in the body.
    let data = header(&[
        ("type", "method"),
        ("method", "services.built-in.ping"),
        ("method", "services.built-in.message_cache.create"),
    ]);
    refused_frame(&mut mallory, &mut alice, data, "\"method\" twice").await;
    let refused = call_with_body(
        &mut mallory,
        &target,
        "services.built-in.ping",
        &[
            ("method", "services.built-in.message_cache.create".into()),
            ("args", Value::Array(vec!["k".into()])),
        ],
    )
    .await;
    assert!(refused.unwrap_err().contains("only the header may carry"));
    // A body key repeated: the server reads the first (a chunked message's `args`), the
    // clients the last.
    let refused = call_with_body(
        &mut mallory,
        &target,
        "services.built-in.message_cache.create",
        &[
            ("args", Value::Array(vec!["k".into(), false.into()])),
            ("args", Value::Array(vec!["x".into(), false.into()])),
        ],
    )
    .await;
    assert!(refused.unwrap_err().contains("\"args\" twice"));
    // What the JavaScript clients' decoder throws on (in Node, out of the process), deep in
    // a body: a key that is not a string or a number, `__proto__`, a timestamp of odd size.
    for (argument, expected) in [
        (
            Value::Map(vec![(Value::Nil, 1.into())]),
            "map key that is nil",
        ),
        (map(&[("__proto__", 1.into())]), "\"__proto__\""),
        (Value::Ext(-1, vec![0; 3]), "timestamp"),
    ] {
        let refused = call_with_body(
            &mut mallory,
            &target,
            "services.built-in.ping",
            &[("args", Value::Array(vec![map(&[("x", argument)])]))],
        )
        .await;
        let refused = refused.unwrap_err();
        assert!(refused.contains(expected), "{refused}");
        assert!(
            refused.contains("JavaScript clients cannot decode"),
            "{refused}"
        );
    }
    assert!(
        next_frame(&mut alice, Duration::from_millis(200))
            .await
            .is_none()
    );
    // The manager's events, and types that crash the JavaScript clients, or a key they cannot
    // decode.
    let data = header(&[("type", "client_disconnected")]);
    refused_frame(&mut mallory, &mut alice, data, "only the server sends").await;
    let data = header(&[("type", "constructor")]);
    refused_frame(
        &mut mallory,
        &mut alice,
        data,
        "every JavaScript object has",
    )
    .await;
    let mut data = header(&[("type", "method")]);
    data[0] += 1;
    data.extend_from_slice(&[0xc0, 0x01]);
    refused_frame(&mut mallory, &mut alice, data, "must be a string").await;
    // A type that is not text (an array `["constructor"]` reads as "constructor" to the
    // JavaScript clients), in the header or in the body merged over it.
    let mut data = header(&[]);
    data[0] += 1;
    data.extend_from_slice(b"\xa4type\x91\xabconstructor");
    refused_frame(
        &mut mallory,
        &mut alice,
        data,
        "field \"type\" must be a string",
    )
    .await;
    let mut data = header(&[("type", "method")]);
    data.extend_from_slice(b"\x81\xa4type\x91\xabconstructor");
    refused_frame(&mut mallory, &mut alice, data, "type that is not a string").await;
    // Strings written overlong, which the JavaScript clients' decoder reads as the name they
    // spell (`C1 9F` is `_`): a `__proto__` key in the header, a `from` key in the body, a
    // header type.
    let overlong_proto = b"\xa9\xc1\x9f_proto__\x01";
    let mut data = header(&[("type", "method")]);
    data[0] += 1;
    data.extend_from_slice(overlong_proto);
    refused_frame(&mut mallory, &mut alice, data, "not valid UTF-8").await;
    let mut data = header(&[("type", "method")]);
    data.extend_from_slice(b"\x81\xa5fro\xc1\xad\xa7manager");
    refused_frame(&mut mallory, &mut alice, data, "not valid UTF-8").await;
    let mut data = header(&[]);
    data[0] += 1;
    data.extend_from_slice(b"\xa4type\xabconstruct\xc1\xb2");
    refused_frame(&mut mallory, &mut alice, data, "not valid UTF-8").await;
    // A chunked message's own header is held to the same rules once assembled.
    let inner = frame(
        &map(&[
            ("type", "method".into()),
            ("method", "s1.resolve.__globals__.os.system".into()),
        ]),
        Some(&map(&[("args", Value::Array(vec!["true".into()]))])),
    );
    let cache = |f: &str| format!("services.built-in.message_cache.{f}");
    for (function, args) in [
        ("create", vec!["k".into(), false.into()]),
        (
            "set",
            vec!["k".into(), 0.into(), Value::Binary(inner), false.into()],
        ),
    ] {
        let session = format!("s{function}");
        let data = frame(
            &map(&[
                ("type", "method".into()),
                ("to", target.as_str().into()),
                ("method", cache(function).into()),
                ("session", session.as_str().into()),
            ]),
            Some(&map(&[("args", Value::Array(args))])),
        );
        mallory.send(Message::Binary(data.into())).await.unwrap();
        let (delivered, _) = next_frame(&mut alice, Duration::from_secs(5))
            .await
            .expect("the cache call is delivered");
        assert_eq!(
            field(&delivered, "method").and_then(Value::as_str),
            Some(cache(function).as_str())
        );
    }
    let refused = call(
        &mut mallory,
        &target,
        &cache("process"),
        vec!["k".into(), false.into()],
    )
    .await;
    let refused = refused.unwrap_err();
    assert!(
        refused.contains("not a function any client offers"),
        "{refused}"
    );
    // Alice got the chunks, never the process: the server tells her to drop them.
    told_to_remove(&mut alice, "k~").await;
    assert!(
        next_frame(&mut alice, Duration::from_millis(200))
            .await
            .is_none()
    );
    // Over HTTP a call goes out as the manager's: never to the chunk cache, never past a
    // function. `built-in` is what every real client registers.
    let svc = map(&[
        ("id", "built-in".into()),
        ("config", map(&[("visibility", "public".into())])),
    ]);
    manager_call(&mut alice, &alice_info, "register_service", vec![svc])
        .await
        .unwrap();
    let base = format!("/{ws}/services/alice:built-in");
    let (status, _, body) = http(
        &app,
        "POST",
        &format!("{base}/message_cache.create"),
        &[("Content-Type", "application/json")],
        b"[\"k\"]",
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("cannot be called over HTTP"), "{body}");
    let (status, _, body) = http(
        &app,
        "GET",
        &format!("{base}/ping.__self__._services"),
        &[],
        b"",
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not a function any client offers"), "{body}");
    // Nor with arguments its receiver cannot decode, from JSON, msgpack or the query.
    let mut nil_key = Vec::new();
    rmpv::encode::write_value(
        &mut nil_key,
        &map(&[("x", Value::Map(vec![(Value::Nil, 1.into())]))]),
    )
    .unwrap();
    for (path, content_type, body) in [
        (
            format!("{base}/ping"),
            "application/json",
            &br#"{"x": {"__proto__": 1}}"#[..],
        ),
        (
            format!("{base}/ping?__proto__=1"),
            "application/json",
            &b""[..],
        ),
        (format!("{base}/ping"), "application/msgpack", &nil_key[..]),
    ] {
        let (status, _, answer) =
            http(&app, "POST", &path, &[("Content-Type", content_type)], body).await;
        assert_eq!(status, 400, "{path}: {answer}");
        assert!(
            answer.contains("JavaScript clients cannot decode"),
            "{path}: {answer}"
        );
    }
    // A msgpack string that is not UTF-8 would be encoded again as binary: refused too.
    let (status, _, answer) = http(
        &app,
        "POST",
        &format!("{base}/ping"),
        &[("Content-Type", "application/msgpack")],
        b"\x81\xa1x\x81\xa1\xff\x01",
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("not valid UTF-8"), "{answer}");
    assert!(
        next_frame(&mut alice, Duration::from_millis(200))
            .await
            .is_none(),
        "an HTTP call reached the client"
    );
    still_works(&app).await;
}

#[tokio::test]
async fn chunked_messages_are_vetted_as_they_pass() {
    let app = spawn_app(|_| {}).await;
    let (mut mallory, _) = connect(&app, "mallory").await;
    let (mut alice, alice_info) = connect(&app, "alice").await;
    let target = format!("{}/alice", alice_info["workspace"].as_str().unwrap());
    let cache = |f: &str| format!("services.built-in.message_cache.{f}");
    let assembled = |extra: &[(&str, Value)]| {
        let mut entries = vec![("args", Value::Array(vec![Value::Binary(vec![1; 600_000])]))];
        entries.extend_from_slice(extra);
        frame(
            &map(&[
                ("type", "method".into()),
                ("method", "services.vault.open".into()),
            ]),
            Some(&map(&entries)),
        )
    };
    // The victim is a raw client here, so its answers are sent by hand.
    async fn send_chunks(
        mallory: &mut Socket,
        alice: &mut Socket,
        target: &str,
        data: &[u8],
        key: &str,
    ) -> Result<Value, String> {
        let cache = |f: &str| format!("services.built-in.message_cache.{f}");
        let mut steps: Vec<(String, Vec<Value>)> =
            vec![(cache("create"), vec![key.into(), false.into()])];
        for (i, chunk) in data.chunks(256 * 1024).enumerate() {
            steps.push((
                cache("set"),
                vec![
                    key.into(),
                    (i as u64).into(),
                    Value::Binary(chunk.to_vec()),
                    false.into(),
                ],
            ));
        }
        steps.push((cache("process"), vec![key.into(), false.into()]));
        let mut last = Ok(Value::Nil);
        for (method, args) in steps {
            let session = format!("s{}", hypha_rtc::ids::random_id(8));
            let header = map(&[
                ("type", "method".into()),
                ("to", target.into()),
                ("method", method.as_str().into()),
                ("session", session.as_str().into()),
            ]);
            let body = map(&[
                ("args", Value::Array(args)),
                ("promise", "*".into()),
                ("t", 30.into()),
            ]);
            mallory
                .send(Message::Binary(frame(&header, Some(&body)).into()))
                .await
                .unwrap();
            // Delivered calls are answered by the victim; refused ones are answered by the
            // server, which tells the victim to drop the chunks of a refused process.
            if let Some((delivered, delivered_body)) =
                next_frame(alice, Duration::from_millis(500)).await
            {
                if field(&delivered, "method").and_then(Value::as_str) == Some(&cache("remove")) {
                    // The removal came before the sender's reject.
                    assert_removal(&delivered, &delivered_body, &format!("{key}~"));
                    let refused = answer(mallory, &session).await;
                    assert!(
                        refused.is_err() && method == cache("process"),
                        "{refused:?}"
                    );
                    return refused;
                }
                assert_eq!(
                    field(&delivered, "method").and_then(Value::as_str),
                    Some(method.as_str())
                );
                let from = field(&delivered, "from")
                    .and_then(Value::as_str)
                    .unwrap()
                    .to_string();
                // Answered under the session it came with (a process's is the server's).
                let delivered_session = field(&delivered, "session")
                    .and_then(Value::as_str)
                    .unwrap();
                let reply = map(&[
                    ("type", "method".into()),
                    ("to", from.as_str().into()),
                    ("method", format!("{delivered_session}.resolve").into()),
                ]);
                alice
                    .send(Message::Binary(
                        frame(
                            &reply,
                            Some(&map(&[("args", Value::Array(vec![Value::Nil]))])),
                        )
                        .into(),
                    ))
                    .await
                    .unwrap();
            }
            last = answer(mallory, &session).await;
            if last.is_err() && method == cache("process") {
                // The chunks reached the victim, the process did not: it is told to drop them.
                told_to_remove(alice, &format!("{key}~")).await;
            }
            last.as_ref().map_err(|e| e.clone())?;
        }
        last
    }
    let clean = assembled(&[]);
    assert_eq!(
        send_chunks(&mut mallory, &mut alice, &target, &clean, "k1").await,
        Ok(Value::Nil)
    );
    let forged = assembled(&[("from", "ws-user-alice/x".into())]);
    let refused = send_chunks(&mut mallory, &mut alice, &target, &forged, "k2").await;
    assert!(refused.unwrap_err().contains("\"from\""));
    // Assembled, the message is fired by its own `type`: a notice only the server sends (which
    // would make alice drop every call to the peer it names) is refused, in the message or
    // in the body merged over it.
    let notice = frame(
        &map(&[
            ("type", "peer_not_found".into()),
            ("peer_id", "ws-user-x/bob".into()),
            ("pad", Value::Binary(vec![1; 600_000])),
        ]),
        None,
    );
    let refused = send_chunks(&mut mallory, &mut alice, &target, &notice, "k3").await;
    assert!(
        refused.unwrap_err().contains("only the server sends"),
        "a chunked notice was delivered"
    );
    let body_notice = assembled(&[("type", "peer_not_found".into())]);
    let refused = send_chunks(&mut mallory, &mut alice, &target, &body_notice, "k4").await;
    assert!(refused.unwrap_err().contains("only the server sends"));
    // A body key the JavaScript clients read as `from` (written overlong, past the first
    // chunk): the chunk that carries it is refused, and so is the message's process.
    let mut overlong = frame(
        &map(&[
            ("type", "method".into()),
            ("method", "services.vault.open".into()),
        ]),
        None,
    );
    overlong.extend_from_slice(b"\x82\xa4args\x91\xc6\x00\x09\x27\xc0");
    overlong.extend(std::iter::repeat_n(1u8, 600_000));
    overlong.extend_from_slice(b"\xa5fro\xc1\xad\xafws-user-alice/x");
    let refused = send_chunks(&mut mallory, &mut alice, &target, &overlong, "k5").await;
    assert!(refused.unwrap_err().contains("not valid UTF-8"));
    let refused = call(
        &mut mallory,
        &target,
        &cache("process"),
        vec!["k5".into(), false.into()],
    )
    .await;
    assert!(refused.unwrap_err().contains("not valid UTF-8"));
    told_to_remove(&mut alice, "k5~").await;
    // Chunks that skip create, or an alias of a cache function, are refused too.
    let skipped = call(
        &mut mallory,
        &target,
        &cache("set"),
        vec![
            "k9".into(),
            0.into(),
            Value::Binary(vec![0x80]),
            false.into(),
        ],
    )
    .await;
    assert!(skipped.unwrap_err().contains("not created"));
    let alias = call(
        &mut mallory,
        &target,
        &format!("{}.__call__", cache("process")),
        vec!["k9".into(), false.into()],
    )
    .await;
    assert!(alias.is_err());
    assert_eq!(app.chunked_in_flight(), 0);
}

#[tokio::test]
async fn calls_to_the_server_per_connection_are_bounded() {
    let app = spawn_app(|s| s.connections.method_timeout = Duration::from_secs(3)).await;
    // A provider that never answers makes get_service wait for its time-out.
    let (mut provider, pinfo) = connect(&app, "mute").await;
    let svc = map(&[
        ("id", "slow".into()),
        ("config", map(&[("visibility", "public".into())])),
    ]);
    manager_call(&mut provider, &pinfo, "register_service", vec![svc])
        .await
        .unwrap();
    let service = format!("{}/mute:slow", pinfo["workspace"].as_str().unwrap());
    let (mut anon, info) = connect(&app, "anon").await;
    let to = manager(&info);
    let mut sessions = Vec::new();
    // Anonymous callers may have 128 calls to the server in flight: the 129th is refused.
    for i in 0..129 {
        let session = format!("g{i}");
        let header = map(&[
            ("type", "method".into()),
            ("to", to.as_str().into()),
            ("method", "services.default.get_service".into()),
            ("session", session.as_str().into()),
        ]);
        let body = map(&[
            ("args", Value::Array(vec![service.as_str().into()])),
            ("promise", "*".into()),
            ("t", 30.into()),
        ]);
        anon.send(Message::Binary(frame(&header, Some(&body)).into()))
            .await
            .unwrap();
        sessions.push(session);
    }
    let last = answer(&mut anon, sessions.last().unwrap()).await;
    assert!(last.unwrap_err().contains("too many calls"));
    drop(provider);
    still_works(&app).await;
}

#[tokio::test]
async fn loose_tokens_are_refused_on_every_path() {
    let app = spawn_app(|_| {}).await;
    let claims = |extra: serde_json::Value| {
        let mut base = json!({
            "iss": "https://amun.ai/", "aud": "https://amun-ai.eu.auth0.com/api/v2/",
            "sub": "eve", "exp": now() + 600, "scope": "",
        });
        base.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        raw_token(base)
    };
    let cases = [
        (claims(json!({"nbf": now() + 3600})), "not valid yet"),
        (claims(json!({"sub": "a/b"})), "sub"),
        (claims(json!({"sub": "x\ny"})), "sub"),
        (claims(json!({"scope": "ws:public#a evil#"})), "scope"),
        (claims(json!({"scope": "ws:a/b#a"})), "scope"),
        (
            claims(json!({"https://amun.ai/roles": ["admin\n"]})),
            "roles",
        ),
        (claims(json!({"https://amun.ai/roles": "admin"})), "JSON"),
        (claims(json!({"use": "sudo"})), "use"),
    ];
    for (bad, word) in cases {
        let ws = connect_with(&app, hello("eve", Some(&bad), None)).await;
        let message = ws.unwrap_err();
        assert!(message.contains(word), "{word}: {message}");
        assert!(
            !message.contains("Error(") && !message.contains("Json("),
            "{message}"
        );
        let (status, _, body) = http(
            &app,
            "GET",
            "/public/services/ws/check_status",
            &[("Authorization", &format!("Bearer {bad}"))],
            b"",
        )
        .await;
        assert_eq!(status, 401, "{word}: {body}");
    }
    still_works(&app).await;
}

#[tokio::test]
async fn errors_say_what_is_wrong_without_internals() {
    let app = spawn_app(|_| {}).await;
    let (status, _, body) = http(
        &app,
        "POST",
        "/demo/offer",
        &[("Content-Type", "application/json")],
        br#"{"sdp": "hello", "type": "offer"}"#,
    )
    .await;
    assert_eq!(status, 400);
    assert!(body.contains("not valid SDP"), "{body}");
    assert!(!body.contains("0x") && !body.contains("Pointer"), "{body}");
    let (status, _, body) = http(
        &app,
        "GET",
        "/public/services/ws/check_status",
        &[("Authorization", "Bearer a.b.c")],
        b"",
    )
    .await;
    assert_eq!(status, 401);
    assert!(
        !body.contains("Error(") && !body.contains("Base64"),
        "{body}"
    );
}

#[tokio::test]
async fn silent_slow_and_surplus_connections_are_cut() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app(|s| {
        s.admission.header_timeout = Duration::from_secs(1);
        s.admission.max_per_address = 6;
    })
    .await;
    async fn closed_within(stream: &mut tokio::net::TcpStream, within: Duration) -> bool {
        let mut sink = [0u8; 1024];
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, stream.read(&mut sink)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
            }
        }
    }
    // Says nothing.
    let mut silent = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    // Sends its request head one byte at a time, forever.
    let mut slow = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let trickle = tokio::spawn(async move {
        for _ in 0..50 {
            if slow.write_all(b"X").await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        closed_within(&mut slow, Duration::from_millis(10)).await
    });
    // Declares 10 GB and sends two bytes.
    let mut body = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    body.write_all(b"POST /public/services/ws/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n{\"").await.unwrap();
    assert!(
        closed_within(&mut silent, Duration::from_secs(4)).await,
        "a silent socket stayed open"
    );
    assert!(
        closed_within(&mut body, Duration::from_secs(6)).await,
        "a stalled body stayed open"
    );
    assert!(trickle.await.unwrap(), "a slow request head stayed open");
    // At most six connections from one address; the seventh is closed at once.
    let mut held = Vec::new();
    for _ in 0..6 {
        let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        stream.write_all(b"G").await.unwrap();
        held.push(stream);
    }
    eventually(Duration::from_secs(5), "the six to be admitted", || {
        app.open_connections() == 6
    })
    .await;
    let mut extra = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    assert!(closed_within(&mut extra, Duration::from_secs(2)).await);
    assert!(app.refused_per_address() >= 1);
    drop(held);
    eventually(Duration::from_secs(5), "the slots to be given back", || {
        app.open_connections() == 0
    })
    .await;
    still_works(&app).await;
}

#[tokio::test]
async fn cross_origin_requests_carry_no_credentials_unless_allowed() {
    let app = spawn_app(|_| {}).await;
    let alice = token(&app, "alice", &[], 600);
    let cookie = format!("access_token={alice}");
    let (_, headers, body) = http(
        &app,
        "GET",
        "/assets/config.json",
        &[("Origin", "http://evil.example"), ("Cookie", &cookie)],
        b"",
    )
    .await;
    assert_eq!(
        header(&headers, "access-control-allow-origin"),
        Some("http://evil.example")
    );
    assert_eq!(header(&headers, "access-control-allow-credentials"), None);
    assert!(
        body.contains("http-anonymous"),
        "the cookie of a foreign origin was used: {body}"
    );
    let own = format!("http://{}", app.addr);
    let (_, headers, body) = http(
        &app,
        "GET",
        "/assets/config.json",
        &[("Origin", &own), ("Cookie", &cookie)],
        b"",
    )
    .await;
    assert_eq!(
        header(&headers, "access-control-allow-credentials"),
        Some("true")
    );
    assert!(body.contains("\"alice\""), "{body}");
    let (status, headers, _) = http(
        &app,
        "OPTIONS",
        "/public/services/ws/echo",
        &[
            ("Origin", "http://evil.example"),
            ("Access-Control-Request-Method", "POST"),
        ],
        b"",
    )
    .await;
    assert_eq!(status, 204);
    assert_eq!(header(&headers, "access-control-allow-credentials"), None);
    let listed = spawn_app(|s| {
        s.http.allow_origins =
            hypha_rtc::http::cors::AllowOrigins::parse("https://app.example.org").unwrap()
    })
    .await;
    let (_, headers, _) = http(
        &listed,
        "GET",
        "/health/liveness",
        &[("Origin", "http://evil.example")],
        b"",
    )
    .await;
    assert_eq!(header(&headers, "access-control-allow-origin"), None);
    let (_, headers, _) = http(
        &listed,
        "GET",
        "/health/liveness",
        &[("Origin", "https://app.example.org")],
        b"",
    )
    .await;
    assert_eq!(
        header(&headers, "access-control-allow-credentials"),
        Some("true")
    );
}

#[tokio::test]
async fn the_client_log_is_rate_limited() {
    let app = spawn_app(|_| {}).await;
    let (mut anon, info) = connect(&app, "chatty").await;
    let mut refused = 0;
    for _ in 0..30 {
        if manager_call(&mut anon, &info, "log", vec!["line\nforged".into()])
            .await
            .is_err()
        {
            refused += 1;
        }
    }
    assert!(refused >= 20, "{refused}");
    still_works(&app).await;
}

#[tokio::test]
async fn pending_sign_ins_and_demo_sessions_are_capped_per_address() {
    let app = spawn_app(|s| {
        s.admission.trusted_proxies =
            hypha_rtc::net::client_addr::TrustedProxies::parse("127.0.0.1").unwrap();
    })
    .await;
    let (mut anon, info) = connect(&app, "starter").await;
    let login = format!("*/{}", info["manager_id"].as_str().unwrap());
    let mut started = 0;
    let mut refusal = String::new();
    for _ in 0..15 {
        match call(&mut anon, &login, "services.hypha-login.start", vec![]).await {
            Ok(_) => started += 1,
            Err(e) => refusal = e,
        }
    }
    assert_eq!(started, 10, "{refusal}");
    assert!(refusal.contains("too many sign-ins"), "{refusal}");
    // Demo offers that never connect: four per address.
    let offer = |n: u32| {
        let mut rtc = str0m::Rtc::builder()
            .enable_h264(true)
            .build(std::time::Instant::now());
        let mut api = rtc.sdp_api();
        api.add_media(
            str0m::media::MediaKind::Video,
            str0m::media::Direction::RecvOnly,
            None,
            None,
            None,
        );
        let sdp = api.apply().unwrap().0.to_sdp_string();
        let _ = n;
        json!({"sdp": sdp, "type": "offer"}).to_string()
    };
    let mut statuses = Vec::new();
    for n in 0..5 {
        let (status, _, _) = http(
            &app,
            "POST",
            "/demo/offer",
            &[
                ("Content-Type", "application/json"),
                ("X-Forwarded-For", "198.51.100.1"),
            ],
            offer(n).as_bytes(),
        )
        .await;
        statuses.push(status);
    }
    assert_eq!(statuses, vec![200, 200, 200, 200, 429]);
    // Another address is not held up by the first.
    let (status, _, _) = http(
        &app,
        "POST",
        "/demo/offer",
        &[
            ("Content-Type", "application/json"),
            ("X-Forwarded-For", "198.51.100.2"),
        ],
        offer(9).as_bytes(),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_lock_out_is_per_account_and_address_and_proxies_must_be_trusted() {
    let untrusted = spawn_app(|s| s.accounts.max_failures = 3).await;
    let trusted = spawn_app(|s| {
        s.accounts.max_failures = 3;
        s.admission.trusted_proxies =
            hypha_rtc::net::client_addr::TrustedProxies::parse("127.0.0.1").unwrap();
    })
    .await;
    for app in [&untrusted, &trusted] {
        let hash = hypha_rtc::auth::accounts::hash_password("correct horse").unwrap();
        let record = hypha_rtc::store::UserRecord {
            id: "ubob".into(),
            email: "bob@example.org".into(),
            password_hash: hash,
            roles: vec![],
            created_at: now(),
            disabled_at: None,
        };
        app.add_user(&record).await;
    }
    async fn sign_in(app: &TestApp, password: &str, from: &str) -> u16 {
        let body = format!("email=bob%40example.org&password={password}");
        let headers = [
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("X-Forwarded-For", from),
        ];
        http(
            app,
            "POST",
            "/public/apps/hypha-login/",
            &headers,
            body.as_bytes(),
        )
        .await
        .0
    }
    for _ in 0..3 {
        assert_eq!(sign_in(&trusted, "wrong", "203.0.113.66").await, 401);
    }
    // The attacker's address is locked out for bob; bob, elsewhere, is not.
    assert_eq!(
        sign_in(&trusted, "correct+horse", "203.0.113.66").await,
        429
    );
    assert_eq!(
        sign_in(&trusted, "correct+horse", "198.51.100.20").await,
        200
    );
    // Without --trusted-proxies, a forged X-Forwarded-For changes nothing: the peer is the address.
    for i in 0..3 {
        assert_eq!(
            sign_in(&untrusted, "wrong", &format!("10.0.0.{i}")).await,
            401
        );
    }
    assert_eq!(sign_in(&untrusted, "correct+horse", "10.9.9.9").await, 429);
}

#[tokio::test]
async fn child_tokens_share_their_accounts_ice_limit_and_anonymous_get_none() {
    let app = spawn_app(|s| s.turn = turn_settings(3)).await;
    let alice = token(&app, "alice", &[], 3600);
    let (mut socket, info) = connect_with(&app, hello("a", Some(&alice), None))
        .await
        .unwrap();
    let get = |token: String| {
        let app = app.clone();
        async move {
            http(
                &app,
                "GET",
                "/public/services/coturn/get_rtc_ice_servers?test_connectivity=false",
                &[("Authorization", &format!("Bearer {token}"))],
                b"",
            )
            .await
        }
    };
    let mut children = Vec::new();
    for i in 0..4 {
        let child = manager_call(
            &mut socket,
            &info,
            "generate_token",
            vec![map(&[("client_id", format!("k{i}").into())])],
        )
        .await
        .unwrap();
        children.push(child.as_str().unwrap().to_string());
    }
    let mut statuses = Vec::new();
    for child in children {
        statuses.push(get(child).await.0);
    }
    assert_eq!(statuses, vec![200, 200, 200, 429]);
    assert_eq!(get(alice.clone()).await.0, 429);
    let (status, _, body) = http(
        &app,
        "GET",
        "/public/services/coturn/get_rtc_ice_servers?test_connectivity=false",
        &[],
        b"",
    )
    .await;
    assert_eq!(status, 403, "{body}");
}

async fn audit_rows(pool: &sqlx::SqlitePool) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM ice_credentials")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn credentials_are_not_issued_when_the_audit_cannot_record_them() {
    let app = spawn_app(|s| s.turn = turn_settings(0)).await;
    let alice = token(&app, "alice", &[], 3600);
    let path = "/public/services/coturn/get_rtc_ice_servers?test_connectivity=false";
    let bearer = format!("Bearer {alice}");
    let headers = [("Authorization", bearer.as_str())];
    let call = || http(&app, "GET", path, &headers, b"");
    assert_eq!(call().await.0, 200);
    let mut issued = 1;
    // The audit table refuses writes from now on, as a read-only store does.
    let db = format!("sqlite://{}", app.database().display());
    let pool = sqlx::SqlitePool::connect(&db).await.unwrap();
    sqlx::query("CREATE TRIGGER deny BEFORE INSERT ON ice_credentials BEGIN SELECT RAISE(ABORT, 'the store is read-only'); END")
        .execute(&pool)
        .await
        .unwrap();
    // Rows are written a few milliseconds after their answer: once the writer has met the
    // refusal, no more credentials are handed out.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let body = loop {
        let (status, _, body) = call().await;
        match status {
            200 => issued += 1,
            503 => break body,
            other => panic!("unexpected {other}: {body}"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "credentials still issued while the audit cannot write"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    assert!(
        body.contains("audit store is unavailable") && !body.contains("credential\":"),
        "{body}"
    );
    let (_, _, ready) = http(&app, "GET", "/health/readiness", &[], b"").await;
    assert!(
        ready.contains("\"store\":{\"detail\"") || ready.contains("unavailable"),
        "{ready}"
    );
    sqlx::query("DROP TRIGGER deny")
        .execute(&pool)
        .await
        .unwrap();
    // The refused rows were kept and retried: once the store takes them, every credential
    // handed out is recorded, and credentials are handed out again.
    let rows = || audit_rows(&pool);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while rows().await < issued {
        assert!(
            std::time::Instant::now() < deadline,
            "{issued} issued, {} recorded",
            rows().await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(rows().await, issued);
    assert_eq!(call().await.0, 200);
    let (_, _, ready) = http(&app, "GET", "/health/readiness", &[], b"").await;
    assert!(ready.contains("\"store\":{\"state\":\"ok\"}"), "{ready}");
}

#[tokio::test]
async fn a_cookie_is_not_used_for_requests_another_site_started() {
    let app = spawn_app(|_| {}).await;
    let alice = token(&app, "alice", &[], 600);
    let cookie = format!("access_token={alice}");
    // A link or a form on another site: a top-level GET with no Origin.
    for (site, honoured) in [
        ("cross-site", false),
        ("same-site", false),
        ("same-origin", true),
        ("none", true),
    ] {
        let (_, _, body) = http(
            &app,
            "GET",
            "/assets/config.json",
            &[("Sec-Fetch-Site", site), ("Cookie", &cookie)],
            b"",
        )
        .await;
        assert_eq!(body.contains("\"alice\""), honoured, "{site}: {body}");
    }
    // The sign-in cookie is never sent along from another site.
    let (_, headers, _) = http(&app, "GET", "/public/apps/hypha-login/logout", &[], b"").await;
    assert!(
        header(&headers, "set-cookie").is_some_and(|c| c.contains("SameSite=Strict")),
        "{headers:?}"
    );
}

#[tokio::test]
async fn oversized_json_bodies_and_floods_of_revocations_are_refused() {
    let app = spawn_app(|_| {}).await;
    // JSON grows many times once decoded: a small bound, said in words.
    let mut body = b"[".to_vec();
    body.extend(b"0,".repeat(1_200_000));
    body.extend(b"0]");
    let (status, _, text) = http(
        &app,
        "POST",
        "/public/services/hypha-login/check",
        &[("Content-Type", "application/json")],
        &body,
    )
    .await;
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("JSON body may hold at most"), "{text}");

    // One account cannot grow the revocation list at will.
    let alice = token(&app, "alice", &[], 3600);
    let (mut socket, info) = connect_with(&app, hello("a", Some(&alice), None))
        .await
        .unwrap();
    let limit = hypha_rtc::auth::token::REVOCATIONS_PER_MINUTE as usize;
    let mut refused = None;
    for i in 0..=limit {
        let child = manager_call(
            &mut socket,
            &info,
            "generate_token",
            vec![map(&[("client_id", format!("k{i}").into())])],
        )
        .await
        .unwrap();
        if let Err(e) = manager_call(&mut socket, &info, "revoke_token", vec![child]).await {
            refused = Some((i, e));
            break;
        }
    }
    let (at, message) = refused.expect("every revocation was accepted");
    assert_eq!(at, limit, "{message}");
    assert!(message.contains("too many revocations"), "{message}");
    // Revocations of expired tokens are forgotten.
    assert_eq!(app.tokens().revoked_count(), limit);
    app.tokens().prune_revoked(now() + 7200);
    assert_eq!(app.tokens().revoked_count(), 0);
    still_works(&app).await;
}

#[tokio::test]
async fn turn_credentials_never_outlive_the_token_that_asked() {
    let app = spawn_app(|s| s.turn = turn_settings(0)).await;
    let brief = token(&app, "alice", &[], 120);
    let path = "/public/services/coturn/get_rtc_ice_servers?test_connectivity=false&ttl=3600";
    let (status, body) = get_as(&app, path, &brief).await;
    assert_eq!(status, 200, "{body}");
    let servers: serde_json::Value = serde_json::from_str(&body).unwrap();
    let username = servers
        .as_array()
        .and_then(|list| list.iter().find_map(|s| s["username"].as_str()))
        .expect("a TURN server with a username");
    let expiry: i64 = username.split(':').next().unwrap().parse().unwrap();
    assert!(expiry <= now() + 121, "{username} outlives its token");
    assert!(expiry > now() + 60, "{username}");
}

#[tokio::test]
async fn readiness_details_are_for_this_machine_and_admins() {
    let app = spawn_app(|s| {
        s.turn = turn_settings(0);
        s.admission.trusted_proxies =
            hypha_rtc::net::client_addr::TrustedProxies::parse("127.0.0.1").unwrap();
    })
    .await;
    let (_, _, local) = http(&app, "GET", "/health/readiness", &[], b"").await;
    assert!(local.contains("127.0.0.1:9"), "{local}");
    let remote = [("X-Forwarded-For", "203.0.113.5")];
    let (status, _, outside) = http(&app, "GET", "/health/readiness", &remote, b"").await;
    assert_eq!(status, 200, "{outside}");
    assert!(outside.contains("\"coturn\":{\"state\""), "{outside}");
    assert!(
        !outside.contains("127.0.0.1:9") && !outside.contains("detail"),
        "{outside}"
    );
    let admin = format!("Bearer {}", token(&app, "root", &["admin"], 600));
    let (_, _, for_admin) = http(
        &app,
        "GET",
        "/health/readiness",
        &[remote[0], ("Authorization", &admin)],
        b"",
    )
    .await;
    assert!(for_admin.contains("127.0.0.1:9"), "{for_admin}");
}

#[tokio::test]
async fn the_client_id_of_http_calls_is_reserved() {
    let app = spawn_app(|_| {}).await;
    let alice = token(&app, "alice", &[], 600);
    let refused = connect_with(&app, hello("http-client", Some(&alice), None)).await;
    let Err(message) = refused else {
        panic!("a websocket client took the HTTP client id");
    };
    assert!(message.contains("reserved"), "{message}");
}

#[tokio::test]
async fn anonymous_users_mint_anonymous_tokens_for_their_own_workspace_only() {
    let app = spawn_app(|s| s.turn = turn_settings(0)).await;
    let (mut anon, info) = connect(&app, "guest").await;
    let own = info["workspace"].as_str().unwrap().to_string();
    // For another workspace, or with more than it holds: refused.
    for config in [
        map(&[("workspace", "ws-user-alice".into())]),
        map(&[
            ("workspace", "public".into()),
            ("permission", "admin".into()),
        ]),
    ] {
        let refused = manager_call(&mut anon, &info, "generate_token", vec![config]).await;
        assert!(refused.is_err(), "{refused:?}");
    }
    let minted = manager_call(
        &mut anon,
        &info,
        "generate_token",
        vec![map(&[("expires_in", 86_400.into())])],
    )
    .await
    .unwrap();
    let token = minted.as_str().unwrap().to_string();
    let child = app.tokens().parse(&token).unwrap();
    assert!(
        child.is_anonymous(),
        "an anonymous user minted a signed-in token"
    );
    assert_eq!(
        child.permission(&own),
        Some(hypha_rtc::auth::Permission::ReadWrite)
    );
    let life = child.token.as_ref().unwrap().expires_at - now();
    assert!((3500..=3600).contains(&life), "{life}");
    // It joins the anonymous workspace, and never gets TURN credentials.
    let (_second, joined) = connect_with(&app, hello("second", Some(&token), None))
        .await
        .unwrap();
    assert_eq!(joined["workspace"], own.as_str());
    let (status, body) = get_as(
        &app,
        "/public/services/coturn/get_rtc_ice_servers?test_connectivity=false",
        &token,
    )
    .await;
    assert_eq!(status, 403, "{body}");
}

#[tokio::test]
async fn one_login_key_holds_one_waiting_check() {
    let app = spawn_app(|_| {}).await;
    let (mut first, info) = connect(&app, "waiter").await;
    let login = format!("*/{}", info["manager_id"].as_str().unwrap());
    let started = call(&mut first, &login, "services.hypha-login.start", vec![])
        .await
        .unwrap();
    let key = field(&started, "key").unwrap().clone();
    // One check waits for the sign-in...
    let waiting = {
        let (login, key) = (login.clone(), key.clone());
        tokio::spawn(async move {
            call(
                &mut first,
                &login,
                "services.hypha-login.check",
                vec![key, 4.into()],
            )
            .await
        })
    };
    // ...and every other check of the same key is refused while it does.
    let (mut second, _) = connect(&app, "piler").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let refused = loop {
        let again = call(
            &mut second,
            &login,
            "services.hypha-login.check",
            vec![key.clone(), 0.2.into()],
        )
        .await;
        match again {
            Err(e) if e.contains("already being checked") => break e,
            _ if tokio::time::Instant::now() > deadline => panic!("a second check was let wait"),
            _ => {}
        }
    };
    assert!(refused.contains("already being checked"), "{refused}");
    let first_outcome = waiting.await.unwrap();
    assert!(
        first_outcome
            .as_ref()
            .is_err_and(|e| e.contains("nobody signed in")),
        "{first_outcome:?}"
    );
    still_works(&app).await;
}

#[tokio::test]
async fn a_process_goes_out_under_a_session_its_sender_never_learns() {
    // The answer to a chunked message's `process` tells the server whether the receiver let
    // the chunks go. A sender that knew the session it goes under could hand the receiver a
    // callback of that name in some other call and settle the message early.
    let app = spawn_app(|_| {}).await;
    let (mut mallory, mallory_info) = connect(&app, "mallory").await;
    let (mut alice, alice_info) = connect(&app, "alice").await;
    let (mut bob, bob_info) = connect(&app, "bob").await;
    let ws = |info: &serde_json::Value| info["workspace"].as_str().unwrap().to_string();
    let (mallory_addr, alice_addr, bob_addr) = (
        format!("{}/mallory", ws(&mallory_info)),
        format!("{}/alice", ws(&alice_info)),
        format!("{}/bob", ws(&bob_info)),
    );
    let cache = |f: &str| format!("services.built-in.message_cache.{f}");
    let callback = |session: &str, name: &str| {
        map(&[
            ("_rtype", "method".into()),
            ("_rtarget", mallory_addr.as_str().into()),
            ("_rmethod", format!("{session}.{name}").into()),
            ("_rpromise", false.into()),
        ])
    };
    let promise = |session: &str| {
        map(&[
            ("heartbeat", callback(session, "heartbeat")),
            ("interval", 15.0.into()),
            ("resolve", callback(session, "resolve")),
            ("reject", callback(session, "reject")),
        ])
    };
    let call = |to: &str, method: &str, session: Option<&str>, body: rmpv::Value| {
        let mut header = vec![
            ("type", "method".into()),
            ("to", to.into()),
            ("method", method.into()),
        ];
        if let Some(session) = session {
            header.push(("session", session.into()));
        }
        Message::Binary(frame(&map(&header), Some(&body)).into())
    };
    let message = frame(
        &map(&[("type", "method".into()), ("method", "services.s.f".into())]),
        Some(&map(&[("args", rmpv::Value::Array(vec![]))])),
    );
    // Mallory sends alice the chunks of message `key` (each delivered), not processed yet.
    let chunks = |key: &str| {
        [
            ("create", vec![key.into(), false.into()]),
            (
                "set",
                vec![
                    key.into(),
                    0.into(),
                    rmpv::Value::Binary(message.clone()),
                    false.into(),
                ],
            ),
        ]
        .map(|(method, args)| {
            let body = map(&[("args", rmpv::Value::Array(args))]);
            call(&alice_addr, &cache(method), None, body)
        })
    };
    /// Sends each frame from one socket and checks the other gets it.
    async fn pass_through(
        from: &mut Socket,
        to: &mut Socket,
        frames: impl IntoIterator<Item = Message>,
    ) {
        for frame in frames {
            from.send(frame).await.unwrap();
            assert!(next_frame(to, Duration::from_secs(5)).await.is_some());
        }
    }
    pass_through(&mut mallory, &mut alice, chunks("k")).await;
    // Mallory's promise aims its reject at bob: the receiver is given callbacks the server
    // wrote, all to mallory.
    let mut aimed = promise("p1");
    if let rmpv::Value::Map(entries) = &mut aimed {
        entries.retain(|(k, _)| k.as_str() != Some("reject"));
        let mut elsewhere = callback("p1", "reject");
        if let rmpv::Value::Map(fields) = &mut elsewhere {
            fields.retain(|(k, _)| k.as_str() != Some("_rtarget"));
            fields.push(("_rtarget".into(), bob_addr.as_str().into()));
        }
        entries.push(("reject".into(), elsewhere));
    }
    let body = map(&[
        ("args", rmpv::Value::Array(vec!["k".into(), false.into()])),
        ("promise", aimed),
    ]);
    mallory
        .send(call(&alice_addr, &cache("process"), Some("p1"), body))
        .await
        .unwrap();
    let (header, body) = next_frame(&mut alice, Duration::from_secs(5))
        .await
        .unwrap();
    let text = |v: Option<&rmpv::Value>| v.and_then(|v| v.as_str()).unwrap_or("").to_string();
    // The first argument of a call (a message key).
    let first_arg = |body: &rmpv::Value| {
        text(
            field(body, "args")
                .and_then(|a| a.as_array())
                .and_then(|a| a.first()),
        )
    };
    let key = first_arg(&body);
    let server = text(field(&header, "session"));
    assert!(server.starts_with('~') && server != "p1", "{header}");
    let delivered = field(&body, "promise").unwrap();
    for name in ["resolve", "reject", "heartbeat"] {
        let callback = field(delivered, name).unwrap();
        assert_eq!(
            text(field(callback, "_rmethod")),
            format!("{server}.{name}")
        );
        assert_eq!(text(field(callback, "_rtarget")), mallory_addr);
    }
    // Alice calls back as a client does: method `<session>.heartbeat`, parent `<session>`.
    let from_alice = |method: String, to: &str| {
        let header = map(&[
            ("type", "method".into()),
            ("to", to.into()),
            ("method", method.into()),
            ("parent", server.as_str().into()),
        ]);
        let body = map(&[("args", rmpv::Value::Array(vec![rmpv::Value::Nil]))]);
        Message::Binary(frame(&header, Some(&body)).into())
    };
    alice
        .send(from_alice(format!("{server}.heartbeat"), &mallory_addr))
        .await
        .unwrap();
    let (header, _) = next_frame(&mut mallory, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(text(field(&header, "method")), "p1.heartbeat");
    assert_eq!(text(field(&header, "parent")), "p1");
    // The trick: alice calls `p1.resolve` (a callback mallory handed her). It reaches
    // mallory, and settles nothing.
    let trick = map(&[
        ("type", "method".into()),
        ("to", mallory_addr.as_str().into()),
        ("method", "p1.resolve".into()),
    ]);
    let body = map(&[("args", rmpv::Value::Array(vec![rmpv::Value::Nil]))]);
    alice
        .send(Message::Binary(frame(&trick, Some(&body)).into()))
        .await
        .unwrap();
    let (header, _) = next_frame(&mut mallory, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(text(field(&header, "method")), "p1.resolve");
    // The server's session sent anywhere but to the sender never leaves the server: alice
    // hears why (her frame is a call), bob gets nothing.
    let misdirected = map(&[
        ("type", "method".into()),
        ("to", bob_addr.as_str().into()),
        ("method", format!("{server}.resolve").into()),
        ("session", "a1".into()),
    ]);
    let body = map(&[
        ("args", rmpv::Value::Array(vec![rmpv::Value::Nil])),
        ("promise", "*".into()),
    ]);
    alice
        .send(Message::Binary(frame(&misdirected, Some(&body)).into()))
        .await
        .unwrap();
    let error = answer(&mut alice, "a1").await.unwrap_err();
    assert!(error.contains("between two other clients"), "{error}");
    assert!(
        next_frame(&mut bob, Duration::from_millis(100))
            .await
            .is_none()
    );
    // The real answer: a reject (the receiver kept the chunks). Mallory is told under its own
    // session, and alice is told to remove the message: it was still awaited.
    alice
        .send(from_alice(format!("{server}.reject"), &mallory_addr))
        .await
        .unwrap();
    let (header, _) = next_frame(&mut mallory, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(text(field(&header, "method")), "p1.reject");
    let (header, body) = next_frame(&mut alice, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(text(field(&header, "method")), cache("remove"));
    let removed = first_arg(&body);
    assert_eq!(removed, key);
    // A process with an argument more (the JavaScript client takes the one after the flag
    // for the context it trusts) is refused.
    pass_through(&mut mallory, &mut alice, chunks("k2")).await;
    let forged_context = map(&[("from", "ws-admin/root".into()), ("ws", "ws-admin".into())]);
    let body = map(&[
        (
            "args",
            rmpv::Value::Array(vec!["k2".into(), false.into(), forged_context, 0.into()]),
        ),
        ("promise", promise("p2")),
    ]);
    mallory
        .send(call(&alice_addr, &cache("process"), Some("p2"), body))
        .await
        .unwrap();
    let error = answer(&mut mallory, "p2").await.unwrap_err();
    assert!(error.contains("takes 2 arguments, not 4"), "{error}");
    // ...and alice told to drop what she got of it.
    let (header, _) = next_frame(&mut alice, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(text(field(&header, "method")), cache("remove"));
    // A process whose body carries a field the server sets (refused before the chunk watch
    // sees it): the same.
    pass_through(&mut mallory, &mut alice, chunks("k3")).await;
    let body = map(&[
        ("args", rmpv::Value::Array(vec!["k3".into(), false.into()])),
        ("promise", promise("p3")),
        ("from", "ws-admin/root".into()),
    ]);
    mallory
        .send(call(&alice_addr, &cache("process"), Some("p3"), body))
        .await
        .unwrap();
    let error = answer(&mut mallory, "p3").await.unwrap_err();
    assert!(error.contains("from"), "{error}");
    let (header, body) = next_frame(&mut alice, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(text(field(&header, "method")), cache("remove"));
    let removed = first_arg(&body);
    assert!(removed.starts_with("k3~"), "{removed}");
    still_works(&app).await;
}

/// HTTP service calls are taken before the router when their path is plain; both ways answer
/// alike, keep the CORS rules, and leave everything else (other methods, escaped or
/// malformed paths, unreadable queries) to the router.
#[tokio::test]
async fn http_service_calls_answer_alike_whichever_way_they_take() {
    let app = spawn_app(|s| s.turn = turn_settings(0)).await;
    let alice = token(&app, "alice", &[], 3600);
    let bearer = format!("Bearer {alice}");
    let as_alice = [("Authorization", bearer.as_str())];
    let ice = "get_rtc_ice_servers?test_connectivity=false&ttl=60";
    let usernames = |body: &str| -> Vec<String> {
        let servers: serde_json::Value = serde_json::from_str(body).unwrap();
        servers
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["username"].as_str().unwrap().to_string())
            .collect()
    };
    // The direct way and, with an escape in the path, the router's.
    for path in [
        format!("/public/services/coturn/{ice}"),
        format!("/public/services/c%6Fturn/{ice}"),
        format!("/%70ublic/services/coturn/{ice}"),
    ] {
        let (status, headers, body) = http(&app, "GET", &path, &as_alice, b"").await;
        assert_eq!(status, 200, "{path}: {body}");
        assert_eq!(header(&headers, "content-type"), Some("application/json"));
        let names = usernames(&body);
        assert!(
            !names.is_empty() && names.iter().all(|n| n.ends_with(":alice")),
            "{path}: {body}"
        );
        let (status, _, body) = http(&app, "POST", &path, &as_alice, b"{}").await;
        assert_eq!(status, 200, "{path}: {body}");
        // Anonymous callers get no credentials either way.
        let (status, _, body) = http(&app, "GET", &path, &[], b"").await;
        assert_eq!(status, 403, "{path}: {body}");
        let (status, headers, body) = http(
            &app,
            "GET",
            &path,
            &[("Accept", "application/msgpack"), as_alice[0]],
            b"",
        )
        .await;
        assert_eq!(status, 200, "{path}: {body}");
        assert_eq!(
            header(&headers, "content-type"),
            Some("application/msgpack")
        );
    }
    // The router answers what is not a plain call: HEAD as GET, other methods refused (with
    // CORS as ever), extra or missing segments not found.
    let path = format!("/public/services/coturn/{ice}");
    let (status, _, _) = http(&app, "HEAD", &path, &as_alice, b"").await;
    assert_eq!(status, 200);
    let evil = ("Origin", "http://evil.example");
    let (status, headers, _) = http(&app, "PUT", &path, &[as_alice[0], evil], b"").await;
    assert_eq!(status, 405);
    assert_eq!(
        header(&headers, "access-control-allow-origin"),
        Some("http://evil.example")
    );
    for path in [
        "/public/services/coturn/get_rtc_ice_servers/",
        "/public/services/coturn/get_rtc_ice_servers/more",
        "/public/service/coturn/get_rtc_ice_servers",
    ] {
        let (status, headers, body) = http(&app, "GET", path, &[as_alice[0], evil], b"").await;
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(
            header(&headers, "access-control-allow-origin"),
            Some("http://evil.example")
        );
    }
    // A query value that is not UTF-8 reads as text with a replacement character, which the
    // function refuses in words.
    let (status, _, body) = http(
        &app,
        "GET",
        "/public/services/coturn/get_rtc_ice_servers?ttl=%FF",
        &as_alice,
        b"",
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("ttl must be a positive integer"), "{body}");
    // CORS holds on the direct way: a foreign page's cookie is not used, the own page's is.
    let cookie = format!("access_token={alice}");
    let own = format!("http://{}", app.addr);
    let (status, headers, body) = http(&app, "GET", &path, &[evil, ("Cookie", &cookie)], b"").await;
    assert_eq!(
        status, 403,
        "the cookie of a foreign origin was used: {body}"
    );
    assert_eq!(
        header(&headers, "access-control-allow-origin"),
        Some("http://evil.example")
    );
    assert_eq!(header(&headers, "access-control-allow-credentials"), None);
    let (status, headers, body) = http(
        &app,
        "GET",
        &path,
        &[("Origin", &own), ("Cookie", &cookie)],
        b"",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        header(&headers, "access-control-allow-credentials"),
        Some("true")
    );
    // A body beyond the bound is refused in words.
    let big = vec![0xc0u8; 16 * 1024 * 1024 + 1];
    let (status, _, body) = http(
        &app,
        "POST",
        "/public/services/coturn/get_rtc_ice_servers",
        &[
            ("Authorization", bearer.as_str()),
            ("Content-Type", "application/msgpack"),
        ],
        &big,
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("at most 16777216 bytes"), "{body}");
}

/// The direct way of HTTP service calls takes the caller's address as the router's way does:
/// a forwarded address counts only from a trusted proxy, so a caller cannot slip out of a
/// per-address limit (ten sign-ins waiting per address) by naming another address each time.
#[tokio::test]
async fn http_service_calls_believe_forwarded_addresses_only_from_trusted_proxies() {
    async fn starts(app: &TestApp, from: impl Fn(usize) -> String) -> Vec<u16> {
        let mut statuses = Vec::new();
        for n in 0..11 {
            let address = from(n);
            let (status, _, _) = http(
                app,
                "POST",
                "/public/services/hypha-login/start",
                &[("X-Forwarded-For", address.as_str())],
                b"",
            )
            .await;
            statuses.push(status);
        }
        statuses
    }
    let mut expected = vec![200; 10];
    expected.push(429);
    let untrusted = spawn_app(|_| {}).await;
    assert_eq!(
        starts(&untrusted, |n| format!("198.51.100.{n}")).await,
        expected
    );
    let trusted = spawn_app(|s| {
        s.admission.trusted_proxies =
            hypha_rtc::net::client_addr::TrustedProxies::parse("127.0.0.1").unwrap();
    })
    .await;
    assert_eq!(
        starts(&trusted, |n| format!("198.51.100.{n}")).await,
        vec![200; 11]
    );
    assert_eq!(starts(&trusted, |_| "203.0.113.7".into()).await, expected);
}

/// A client that asks for replies outside the queue (`refresh_token`) and never reads them
/// fills its socket's buffers: the server gives up on it within the ping time-out rather than
/// waiting for ever with the connection, its session and its slot held.
#[tokio::test]
async fn a_client_that_never_reads_its_control_replies_is_let_go() {
    use futures_util::StreamExt;
    let app = spawn_app(|s| {
        s.connections.ping_timeout = Duration::from_secs(2);
        s.connections.rate_limit = 1_000_000;
    })
    .await;
    let alice = token(&app, "alice", &[], 3600);
    let (socket, info) = connect_with(&app, hello("deaf", Some(&alice), None))
        .await
        .unwrap();
    let addr = format!("{}/deaf", info["workspace"].as_str().unwrap());
    assert!(app.is_connected(&addr));
    // The reading half is kept, and never read.
    let (mut sink, _unread) = socket.split();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut sent = 0u64;
    while app.is_connected(&addr) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still connected after {sent} requests"
        );
        let request = Message::Text(r#"{"type":"refresh_token"}"#.into());
        match tokio::time::timeout(Duration::from_millis(100), sink.send(request)).await {
            Ok(Ok(())) => sent += 1,
            // The buffers are full both ways, or the server has let go.
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
        if sent.is_multiple_of(512) {
            tokio::task::yield_now().await;
        }
    }
    still_works(&app).await;
}

/// A sign-in form posted by another site (login CSRF: the visitor silently signed in to the
/// attacker's account) or by an app's sandboxed page is refused before any password is
/// checked; the server's own page (same origin, or no browser at all) still signs in.
#[tokio::test]
async fn sign_in_forms_from_other_sites_are_refused() {
    let app = spawn_app(|_| {}).await;
    let hash = hypha_rtc::auth::accounts::hash_password("correct horse").unwrap();
    app.add_user(&hypha_rtc::store::UserRecord {
        id: "umallory".into(),
        email: "mallory@example.org".into(),
        password_hash: hash,
        roles: vec![],
        created_at: now(),
        disabled_at: None,
    })
    .await;
    let form = b"email=mallory%40example.org&password=correct+horse";
    let post = |extra: Vec<(&'static str, &'static str)>| {
        let app = &app;
        async move {
            let mut headers = vec![("Content-Type", "application/x-www-form-urlencoded")];
            headers.extend(extra);
            http(app, "POST", "/public/apps/hypha-login/", &headers, form).await
        }
    };
    for hostile in [
        vec![
            ("Origin", "https://evil.example"),
            ("Sec-Fetch-Site", "cross-site"),
        ],
        vec![("Sec-Fetch-Site", "cross-site")],
        vec![("Origin", "null"), ("Sec-Fetch-Site", "cross-site")],
    ] {
        let (status, headers, body) = post(hostile.clone()).await;
        assert_eq!(status, 403, "{hostile:?}: {body}");
        assert!(body.contains("another site"), "{body}");
        assert!(header(&headers, "set-cookie").is_none(), "{hostile:?}");
    }
    for own in [vec![("Sec-Fetch-Site", "same-origin")], vec![]] {
        let (status, headers, body) = post(own.clone()).await;
        assert_eq!(status, 200, "{own:?}: {body}");
        assert!(header(&headers, "set-cookie").is_some_and(|c| c.contains("access_token=")));
    }
}

/// A reconnection token carries the grants of the token the client came with, not the
/// permission its connection had: an owner removed from a workspace gets no admin back by
/// reconnecting with a reconnection token from before (or refreshed after) the removal.
#[tokio::test]
async fn a_removed_owner_does_not_get_back_in_through_a_reconnection_token() {
    let app = spawn_app(|_| {}).await;
    let alice = token(&app, "alice", &[], 3600);
    let carol = token(&app, "carol", &[], 3600);
    let (mut home, info) = connect_with(&app, hello("a-home", Some(&alice), None))
        .await
        .unwrap();
    let described = |owners: &[&str]| {
        map(&[
            ("id", "lab-owned".into()),
            (
                "owners",
                Value::Array(owners.iter().map(|o| Value::from(*o)).collect()),
            ),
        ])
    };
    manager_call(
        &mut home,
        &info,
        "create_workspace",
        vec![described(&["alice", "carol"])],
    )
    .await
    .unwrap();
    let resume = |reconnection: &str| {
        json!({"client_id": "c-1", "workspace": "lab-owned", "token": null,
               "reconnection_token": reconnection})
    };
    let (inside, inside_info) = connect_with(&app, hello("c-1", Some(&carol), Some("lab-owned")))
        .await
        .unwrap();
    let reconnection = inside_info["reconnection_token"]
        .as_str()
        .unwrap()
        .to_string();
    drop(inside);
    eventually(Duration::from_secs(10), "carol's connection to end", || {
        !app.is_connected("lab-owned/c-1")
    })
    .await;
    // While she owns it, the reconnection token brings her back.
    let (back, _) = connect_with(&app, resume(&reconnection)).await.unwrap();
    drop(back);
    eventually(Duration::from_secs(10), "carol's connection to end", || {
        !app.is_connected("lab-owned/c-1")
    })
    .await;
    manager_call(
        &mut home,
        &info,
        "create_workspace",
        vec![described(&["alice"]), true.into()],
    )
    .await
    .unwrap();
    let refused = connect_with(&app, resume(&reconnection)).await;
    assert!(refused.is_err(), "a removed owner got back in");
    still_works(&app).await;
}

/// HTTP streams (`GET /rpc`) are counted by their client's address as connections are, by
/// themselves: over HTTP/2, or behind a proxy, one connection carries many, each a session.
/// Past the limit a stream is refused (429); one closed gives its place back.
#[tokio::test]
async fn http_streams_are_counted_per_address_by_themselves() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app(|s| {
        s.admission.max_per_address = 2;
        s.admission.trusted_proxies =
            hypha_rtc::net::client_addr::TrustedProxies::parse("127.0.0.1").unwrap();
    })
    .await;
    // A stream from 198.51.100.7 through the (trusted) proxy on loopback: its status, and
    // the connection, kept open while the stream lives.
    let open = |client: &'static str| {
        let addr = app.addr;
        async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let request = format!(
                "GET /rpc?client_id={client} HTTP/1.1\r\nHost: {addr}\r\n\
                 X-Forwarded-For: 198.51.100.7\r\n\r\n"
            );
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut head = vec![0u8; 12];
            tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut head))
                .await
                .expect("a status in time")
                .unwrap();
            let status: u16 = String::from_utf8_lossy(&head[9..12]).parse().unwrap();
            (status, stream)
        }
    };
    let (first, first_stream) = open("s1").await;
    let (second, _second_stream) = open("s2").await;
    let (third, _) = open("s3").await;
    assert_eq!((first, second, third), (200, 200, 429));
    drop(first_stream);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (again, _kept) = open("s4").await;
        if again == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the place was not given back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
