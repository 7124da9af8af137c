//! `public/video-producer`: the demo video producer as an RTC service, so the unmodified
//! clients reach it with `get_rtc_service`: `offer({sdp, type})` answers with live video.

use std::sync::{Arc, LazyLock};

use futures_util::future::BoxFuture;
use rmpv::Value;
use serde_json::json;

use super::HostedService;
use crate::AppState;
use crate::error::Error;
use crate::rpc::describe::Function;
use crate::rpc::peer::CallContext;
use crate::rpc::value::{Args, get_str, obj};

/// The `video-producer` service.
pub(crate) struct VideoProducer;

static FUNCTIONS: LazyLock<Vec<Function>> = LazyLock::new(|| {
    vec![Function::new(
        "offer",
        "Answer a WebRTC offer {sdp, type} with live video",
        json!({"params": {"type": "object", "description": "{sdp, type}"}}),
        &["params"],
    )]
});

impl HostedService for VideoProducer {
    fn name(&self) -> &'static str {
        "video-producer"
    }

    fn summary(&self) -> &'static str {
        "Demo video producer: offer() answers a WebRTC offer with live video"
    }

    fn kind(&self) -> &'static str {
        "rtc"
    }

    fn functions(&self) -> &[Function] {
        &FUNCTIONS
    }

    fn call<'a>(
        &'a self,
        app: &'a Arc<AppState>,
        ctx: &'a CallContext,
        function: &'a str,
        args: &'a Args,
    ) -> BoxFuture<'a, Result<Value, Error>> {
        Box::pin(async move {
            match function {
                "offer" => offer(app, ctx, args).await,
                _ => Err(super::not_found("video-producer", function)),
            }
        })
    }
}

async fn offer(app: &AppState, ctx: &CallContext, args: &Args) -> Result<Value, Error> {
    let params = args
        .get(0, "params")
        .ok_or_else(|| Error::BadRequest("offer needs {sdp, type}".into()))?;
    let sdp =
        get_str(params, "sdp").ok_or_else(|| Error::BadRequest("the offer has no sdp".into()))?;
    if get_str(params, "type") != Some("offer") {
        return Err(Error::BadRequest("type must be \"offer\"".into()));
    }
    let answer = crate::demo::peer::start(&app.demo, sdp, ctx.user.clone(), ctx.peer_ip).await?;
    Ok(obj([
        ("sdp", answer.into()),
        ("type", "answer".into()),
        ("workspace", "public".into()),
    ]))
}
