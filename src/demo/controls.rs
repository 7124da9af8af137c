//! What a viewer may change (text, speed, pause) and the two ways a change arrives on the
//! viewer's data channel: the page's JSON text messages, and hypha-rpc calls (binary frames)
//! to the `controls` service, answered by the server's own RPC runtime, so a Python or
//! JavaScript client reaches it with `pc.get_service("controls")`.

use std::sync::{Arc, LazyLock};

use bytes::Bytes;
use rmpv::Value;

use crate::auth::UserInfo;
use crate::error::Error;
use crate::rpc::describe::{self, Envelope, Function};
use crate::rpc::frame::Frame;
use crate::rpc::peer::{self, Call, Incoming};
use crate::rpc::value::{self, Args, obj};

/// The name of the service on the data channel.
pub(crate) const SERVICE: &str = "controls";
/// Longest text accepted from a viewer.
pub(crate) const MAX_TEXT: usize = 200;
/// Largest message accepted on the channel: a control call is a few hundred bytes, and a
/// small cap bounds what decoding a hostile frame can allocate. hypha-rpc sends anything
/// above 256 KiB in chunks through `message_cache`, which this peer refuses with a message.
pub(crate) const MAX_MESSAGE: usize = 16 * 1024;

/// A viewer whose controls can be changed. Values reaching it are already validated.
pub(crate) trait Controllable {
    fn set_text(&mut self, text: String);
    fn set_speed(&mut self, pixels_per_second: f32);
    fn set_paused(&mut self, paused: bool);
    fn state(&self) -> ViewerState;
}

/// What a viewer shows now; every answer carries it, so the caller sees what took effect.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ViewerState {
    pub text: String,
    pub speed: f32,
    pub paused: bool,
    pub width: usize,
    pub height: usize,
    pub frames: u64,
    pub fps: f32,
}

impl ViewerState {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "ok": true, "text": self.text, "speed": self.speed, "paused": self.paused,
            "width": self.width, "height": self.height, "frames": self.frames, "fps": self.fps,
        })
    }
}

fn check_text(text: &str) -> Result<String, Error> {
    if text.chars().count() > MAX_TEXT {
        return Err(Error::BadRequest(format!(
            "the text has more than {MAX_TEXT} characters"
        )));
    }
    Ok(text.to_string())
}

/// Clamps a speed into what the scene accepts; refuses what is not a number.
fn check_speed(speed: f64) -> Result<f32, Error> {
    if !speed.is_finite() {
        return Err(Error::BadRequest(
            "the speed must be a finite number".into(),
        ));
    }
    Ok((speed.clamp(0.0, super::scene::MAX_SPEED as f64)) as f32)
}

/// A control message from the page: any of text, speed (pixels per second), paused.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonControl {
    text: Option<String>,
    speed: Option<f64>,
    paused: Option<bool>,
}

/// Applies the page's JSON message; the answer is the viewer's whole state or an error. A
/// message with one bad field changes nothing.
pub(crate) fn on_json(viewer: &mut impl Controllable, data: &[u8]) -> String {
    let outcome = serde_json::from_slice::<JsonControl>(data)
        .map_err(|e| {
            Error::BadRequest(format!(
                "a control message is JSON with text, speed or paused: {e}"
            ))
        })
        .and_then(|m| {
            let text = m.text.as_deref().map(check_text).transpose()?;
            let speed = m.speed.map(check_speed).transpose()?;
            Ok((text, speed, m.paused))
        });
    match outcome {
        Ok((text, speed, paused)) => {
            if let Some(text) = text {
                viewer.set_text(text);
            }
            if let Some(speed) = speed {
                viewer.set_speed(speed);
            }
            if let Some(paused) = paused {
                viewer.set_paused(paused);
            }
            viewer.state().to_json().to_string()
        }
        Err(e) => serde_json::json!({"ok": false, "error": e.to_string()}).to_string(),
    }
}

/// The functions of the `controls` service.
static FUNCTIONS: LazyLock<Vec<Function>> = LazyLock::new(|| {
    vec![
        Function::new(
            "set_text",
            "Show this text (at most 200 characters); returns the viewer's state.",
            serde_json::json!({"text":{"type":"string"}}),
            &["text"],
        ),
        Function::new(
            "set_speed",
            "Move the text at this many pixels per second (clamped to 0..2000); returns the viewer's state.",
            serde_json::json!({"speed":{"type":"number"}}),
            &["speed"],
        ),
        Function::new(
            "stop",
            "Pause the video; returns the viewer's state.",
            serde_json::json!({}),
            &[],
        ),
        Function::new(
            "start",
            "Resume the video with a keyframe; returns the viewer's state.",
            serde_json::json!({}),
            &[],
        ),
        Function::new(
            "get_state",
            "Text, speed, paused, resolution, frames sent and the measured frame rate.",
            serde_json::json!({}),
            &[],
        ),
    ]
});

/// The `user` field of the frames this peer sends.
static REPLY_USER: LazyLock<Value> = LazyLock::new(|| obj([("id", "video-producer".into())]));

/// Answers one hypha-rpc frame from the channel; returns the reply frame, if any. `user` is
/// who opened the channel, known from the signaling call.
pub(crate) fn on_rpc(
    viewer: &mut impl Controllable,
    data: Vec<u8>,
    user: &Arc<UserInfo>,
) -> Option<Bytes> {
    if data.len() > MAX_MESSAGE {
        tracing::debug!(
            bytes = data.len(),
            "oversized frame on a demo channel dropped"
        );
        return None;
    }
    let frame = match Frame::parse(Bytes::from(data)) {
        Ok(frame) => frame,
        Err(e) => {
            tracing::debug!(error = %e, "undecodable frame on a demo channel");
            return None;
        }
    };
    // No server stands between the two ends of a data channel: the caller's address is what
    // it says, and only this viewer's own client can reach this channel.
    let from = frame.field("from").unwrap_or("").to_string();
    let to = frame.field("to").unwrap_or("").to_string();
    let incoming = Incoming {
        from,
        ws: "public".into(),
        user: user.clone(),
        to,
        frame,
        peer_ip: None,
        slots: None,
    };
    let call = match peer::decode_call(incoming) {
        Ok(Some(call)) => call,
        Ok(None) => return None,
        Err(e) => {
            tracing::debug!(error = %e, "bad call on a demo channel");
            return None;
        }
    };
    let outcome = dispatch(viewer, &call);
    peer::reply_frame(
        &call,
        outcome.map_err(|e| crate::rpc::peer::Rejection(e.public_message())),
        &REPLY_USER,
    )
}

fn dispatch(viewer: &mut impl Controllable, call: &Call) -> Result<Value, Error> {
    let (service, function) = call.target()?;
    let args = &call.args;
    match (service, function) {
        ("built-in", "get_service") => {
            let id = args.require_str(0, "service_id")?;
            // `name`, `ws/client:name` or `name@app`: only the name matters on a channel.
            let name = id.rsplit(':').next().unwrap_or(id);
            let name = name.split('@').next().unwrap_or(name);
            if name != SERVICE {
                return Err(Error::NotFound(format!(
                    "Service not found: {id} (this channel offers \"{SERVICE}\")"
                )));
            }
            let id = format!("{}:{SERVICE}", call.ctx.to);
            let envelope = Envelope {
                id: &id,
                name: SERVICE,
                kind: "functions",
                description: "The controls of this viewer of the demo video",
                config: describe::public_config("public"),
            };
            Ok(describe::describe(&call.ctx.to, envelope, &FUNCTIONS))
        }
        ("built-in", "ping") => Ok("pong".into()),
        ("built-in", f) if f.starts_with("message_cache.") => Err(Error::BadRequest(format!(
            "messages over {MAX_MESSAGE} bytes are not accepted on the demo's data channel"
        ))),
        (SERVICE, function) => control(viewer, function, args),
        _ => Err(Error::NotFound(format!(
            "Method not found: {}",
            call.method
        ))),
    }
}

fn control(viewer: &mut impl Controllable, function: &str, args: &Args) -> Result<Value, Error> {
    match function {
        "set_text" => {
            let text = args
                .get(0, "text")
                .ok_or_else(|| Error::BadRequest("set_text needs a text".into()))?;
            let text = text
                .as_str()
                .ok_or_else(|| Error::BadRequest("the text must be a string".into()))?;
            viewer.set_text(check_text(text)?);
        }
        "set_speed" => {
            let speed = args
                .get(0, "speed")
                .and_then(|v| v.as_f64().or_else(|| v.as_i64().map(|i| i as f64)))
                .ok_or_else(|| Error::BadRequest("set_speed needs a number".into()))?;
            viewer.set_speed(check_speed(speed)?);
        }
        "stop" => viewer.set_paused(true),
        "start" => viewer.set_paused(false),
        "get_state" => {}
        _ => {
            return Err(Error::NotFound(format!(
                "Method not found: services.{SERVICE}.{function}"
            )));
        }
    }
    Ok(value::from_json(&viewer.state().to_json()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::frame;
    use crate::rpc::value::get_str;

    #[derive(Default)]
    struct Fake {
        text: String,
        speed: f32,
        paused: bool,
    }

    impl Controllable for Fake {
        fn set_text(&mut self, text: String) {
            self.text = text;
        }
        fn set_speed(&mut self, speed: f32) {
            self.speed = speed;
        }
        fn set_paused(&mut self, paused: bool) {
            self.paused = paused;
        }
        fn state(&self) -> ViewerState {
            ViewerState {
                text: self.text.clone(),
                speed: self.speed,
                paused: self.paused,
                width: 64,
                height: 48,
                frames: 0,
                fps: 0.0,
            }
        }
    }

    fn call(method: &str, args: Vec<Value>) -> Vec<u8> {
        let header = obj([
            ("type", "method".into()),
            ("from", "public/caller".into()),
            ("to", "public/peer1".into()),
            ("method", method.into()),
            ("session", "s1".into()),
        ]);
        let body = obj([("args", Value::Array(args)), ("promise", "*".into())]);
        frame::encode(&header, Some(&body)).to_vec()
    }

    fn answer(reply: Option<Bytes>) -> (String, Value) {
        let frame = Frame::parse(reply.expect("a reply")).unwrap();
        assert_eq!(frame.field("to"), Some("public/caller"));
        assert_eq!(frame.field("from"), Some("public/peer1"));
        let body = rmpv::decode::read_value(&mut &frame.body[..]).unwrap();
        let first = value::get(&body, "args").unwrap().as_array().unwrap()[0].clone();
        (frame.field("method").unwrap().to_string(), first)
    }

    fn peer() -> Arc<UserInfo> {
        Arc::new(UserInfo::http_anonymous())
    }

    #[test]
    fn rpc_calls_change_the_viewer_and_bad_ones_are_rejected() {
        let mut v = Fake::default();
        let p = peer();
        let (m, svc) = answer(on_rpc(
            &mut v,
            call("services.built-in.get_service", vec!["controls".into()]),
            &p,
        ));
        assert_eq!(m, "s1.resolve");
        let set_text = value::get(&svc, "set_text").unwrap();
        assert_eq!(get_str(set_text, "_rtarget"), Some("public/peer1"));
        assert_eq!(
            get_str(set_text, "_rmethod"),
            Some("services.controls.set_text")
        );
        let (m, state) = answer(on_rpc(
            &mut v,
            call("services.controls.set_text", vec!["hi".into()]),
            &p,
        ));
        assert_eq!(
            (m.as_str(), get_str(&state, "text")),
            ("s1.resolve", Some("hi"))
        );
        let (m, err) = answer(on_rpc(
            &mut v,
            call("services.controls.set_text", vec!["x".repeat(201).into()]),
            &p,
        ));
        assert_eq!(m, "s1.reject");
        assert!(get_str(&err, "_rvalue").unwrap().contains("more than 200"));
        assert_eq!(v.text, "hi");
        answer(on_rpc(
            &mut v,
            call("services.controls.set_speed", vec![(-5.0).into()]),
            &p,
        ));
        assert_eq!(v.speed, 0.0);
        answer(on_rpc(
            &mut v,
            call("services.controls.set_speed", vec![1e12.into()]),
            &p,
        ));
        assert_eq!(v.speed, super::super::scene::MAX_SPEED);
        let (m, _) = answer(on_rpc(&mut v, call("services.controls.stop", vec![]), &p));
        assert_eq!(m, "s1.resolve");
        assert!(v.paused);
        let (m, err) = answer(on_rpc(
            &mut v,
            call("services.built-in.get_service", vec!["other".into()]),
            &p,
        ));
        assert_eq!(m, "s1.reject");
        assert!(get_str(&err, "_rvalue").unwrap().contains("controls"));
        let (m, _) = answer(on_rpc(
            &mut v,
            call("services.built-in.message_cache.create", vec!["k".into()]),
            &p,
        ));
        assert_eq!(m, "s1.reject");
        assert!(on_rpc(&mut v, vec![0xc1, 0x00], &p).is_none());
        assert!(on_rpc(&mut v, vec![0; MAX_MESSAGE + 1], &p).is_none());
    }

    #[test]
    fn json_messages_apply_whole_or_not_at_all() {
        let mut v = Fake::default();
        let ok: serde_json::Value =
            serde_json::from_str(&on_json(&mut v, br#"{"text":"a","speed":-3}"#)).unwrap();
        assert_eq!(
            (ok["ok"].as_bool(), ok["speed"].as_f64()),
            (Some(true), Some(0.0))
        );
        let bad: serde_json::Value = serde_json::from_str(&on_json(
            &mut v,
            format!(r#"{{"text":"{}","speed":5}}"#, "y".repeat(300)).as_bytes(),
        ))
        .unwrap();
        assert_eq!(bad["ok"].as_bool(), Some(false));
        assert_eq!((v.text.as_str(), v.speed), ("a", 0.0));
        let bad: serde_json::Value = serde_json::from_str(&on_json(&mut v, b"not json")).unwrap();
        assert!(bad["error"].as_str().unwrap().contains("JSON"));
    }
}
