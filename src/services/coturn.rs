//! `public/coturn`: TURN credentials for WebRTC, the same as the manager's
//! `get_rtc_ice_servers` (legacy pages fetch them from here over HTTP).

use std::sync::{Arc, LazyLock};

use futures_util::future::BoxFuture;
use rmpv::Value;
use serde_json::json;

use super::HostedService;
use crate::AppState;
use crate::error::Error;
use crate::rpc::describe::Function;
use crate::rpc::peer::CallContext;
use crate::rpc::value::Args;

/// The `coturn` service.
pub(crate) struct Coturn;

/// `get_rtc_ice_servers`, described once for the manager and for this service.
pub(crate) fn ice_function() -> Function {
    Function::new(
        "get_rtc_ice_servers",
        "Time-limited TURN/STUN servers for RTCPeerConnection; refused for anonymous users.",
        json!({
            "ttl": {"type": "integer", "description": "Credential lifetime in seconds (default 43200)"},
            "test_connectivity": {"type": "boolean", "description": "Probe coturn first (default true)"},
        }),
        &[],
    )
}

static FUNCTIONS: LazyLock<Vec<Function>> = LazyLock::new(|| vec![ice_function()]);

impl HostedService for Coturn {
    fn name(&self) -> &'static str {
        "coturn"
    }

    fn summary(&self) -> &'static str {
        "TURN credentials for WebRTC"
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
                "get_rtc_ice_servers" => ice_servers(app, ctx, args).await,
                _ => Err(super::not_found("coturn", function)),
            }
        })
    }
}

/// `get_rtc_ice_servers(ttl=43200, test_connectivity=True)`, positional or keyword.
pub(crate) async fn ice_servers(
    app: &AppState,
    ctx: &CallContext,
    args: &Args,
) -> Result<Value, Error> {
    let ttl = match args.get(0, "ttl") {
        None => None,
        Some(v) => Some(v.as_u64().filter(|t| *t > 0).ok_or_else(|| {
            Error::BadRequest(format!(
                "ttl must be a positive integer number of seconds, not {v}"
            ))
        })?),
    };
    let test_connectivity = match args.get(1, "test_connectivity") {
        None => true,
        Some(Value::Boolean(b)) => *b,
        Some(v) => {
            return Err(Error::BadRequest(format!(
                "test_connectivity must be true or false, not {v}"
            )));
        }
    };
    let request = crate::turn::IceRequest {
        ttl,
        test_connectivity,
    };
    Ok(app.ice.ice_servers(&ctx.user, request).await?)
}
