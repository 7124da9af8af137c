//! The services the server hosts itself: the workspace manager (`default`) with its
//! `built-in` service, and in `public`: `hypha-login`, `coturn` and `video-producer`. Each is
//! one [`HostedService`], whose function table and dispatch live side by side in its own
//! module; they are registered once, in [`Hosted::new`]. Frames the hub routes to the server
//! come here ([`run`]): calls are decoded, run (with heartbeats for long ones) and answered.

pub(crate) mod builtin;
pub(crate) mod coturn;
pub(crate) mod exports;
pub(crate) mod listing;
pub(crate) mod login;
pub(crate) mod manager;
pub(crate) mod video;
pub(crate) mod workspace_data;
pub(crate) mod workspaces;

use std::sync::Arc;

use futures_util::future::BoxFuture;
use rmpv::Value;

use crate::AppState;
use crate::error::Error;
use crate::hub::{Outbound, ToServer};
use crate::rpc::describe::{self, Envelope, Function};
use crate::rpc::peer::{Call, CallContext, Decoded, Incoming};
use crate::rpc::value::{Args, obj};

/// A service the server answers itself.
pub(crate) trait HostedService: Send + Sync {
    /// Its name: the `<service>` of `services.<service>.<function>`.
    fn name(&self) -> &'static str;
    /// What it says of itself.
    fn summary(&self) -> &'static str;
    /// Its `type`.
    fn kind(&self) -> &'static str {
        "functions"
    }
    /// Whether it is registered in `public`, where anyone finds it by name.
    fn public(&self) -> bool {
        true
    }
    /// Its functions, with their schemas.
    fn functions(&self) -> &[Function];
    /// Runs one of its functions.
    fn call<'a>(
        &'a self,
        app: &'a Arc<AppState>,
        ctx: &'a CallContext,
        function: &'a str,
        args: &'a Args,
    ) -> BoxFuture<'a, Result<Value, Error>>;
    /// What `get_service` returns for it.
    fn description(&self, app: &AppState) -> Value {
        let id = format!("public/{}:{}", app.manager_id(), self.name());
        let envelope = Envelope {
            id: &id,
            name: self.name(),
            kind: self.kind(),
            description: self.summary(),
            config: describe::public_config("public"),
        };
        describe::describe(&app.peer.manager_addr(), envelope, self.functions())
    }
}

/// The refusal for a function a service does not have.
pub(crate) fn not_found(service: &str, function: &str) -> Error {
    Error::NotFound(format!("Method not found: services.{service}.{function}"))
}

/// The hosted services of this server.
pub struct Hosted {
    services: Vec<Arc<dyn HostedService>>,
}

impl Hosted {
    /// Every hosted service; the demo's only when the demo is on.
    pub(crate) fn new(demo: bool) -> Self {
        let mut services: Vec<Arc<dyn HostedService>> = vec![
            Arc::new(manager::Manager),
            Arc::new(builtin::BuiltIn),
            Arc::new(coturn::Coturn),
            Arc::new(login::Login),
        ];
        if demo {
            services.push(Arc::new(video::VideoProducer));
        }
        Self { services }
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Arc<dyn HostedService>> {
        self.services.iter().find(|s| s.name() == name)
    }

    /// Registers the public ones, so one lookup path serves them and client services.
    pub(crate) fn register(&self, app: &AppState) {
        for service in self.services.iter().filter(|s| s.public()) {
            let name = service.name();
            let id = format!("public/{}:{name}", app.manager_id());
            let info = obj([
                ("id", id.as_str().into()),
                ("name", name.into()),
                ("description", service.summary().into()),
                ("type", service.kind().into()),
                (
                    "config",
                    obj([
                        ("visibility", "public".into()),
                        ("require_context", true.into()),
                    ]),
                ),
            ]);
            match crate::ids::ServiceId::parse(&id)
                .map_err(|e| Error::Internal(e.to_string()))
                .and_then(|id| crate::registry::ServiceEntry::from_info(id, info))
            {
                Ok(entry) => app.registry.insert(entry),
                Err(e) => tracing::error!(error = %e, "cannot register hosted service {name}"),
            }
        }
    }
}

/// Names in `public` only the server's own services may have (whether or not they run).
pub(crate) fn is_reserved_public_name(name: &str) -> bool {
    matches!(
        name,
        "default" | "built-in" | "coturn" | "hypha-login" | "video-producer"
    )
}

/// Takes the frames the hub routes to the server, until the hub stops; each runs in a task of
/// its own, holding its caller's place among the calls it may have running.
pub(crate) async fn run(app: Arc<AppState>, mut frames: tokio::sync::mpsc::Receiver<ToServer>) {
    while let Some(ToServer { incoming, running }) = frames.recv().await {
        let app = app.clone();
        tokio::spawn(async move {
            handle(app, incoming).await;
            drop(running);
        });
    }
}

/// Handles a frame addressed to the server: runs a call and answers it, or completes one of
/// the server's own pending calls.
pub(crate) async fn handle(app: Arc<AppState>, incoming: Incoming) {
    let from = incoming.from.clone();
    let to = incoming.to.clone();
    let frame = incoming.frame.clone();
    match app.peer.decode(incoming) {
        Err(e) => {
            tracing::debug!(%from, error = %e, "undecodable call to the server");
            // A call that asked for an answer learns why it was refused.
            if let Some(reject) = crate::rpc::peer::refusal(&frame, &to, &from, &e.to_string()) {
                let _ = app.hub.send(&from, Outbound::Binary(reject)).await;
            }
        }
        Ok(Decoded::Reply | Decoded::Ignored) => {}
        Ok(Decoded::Call(call)) => run_call(&app, *call).await,
    }
}

async fn run_call(app: &Arc<AppState>, call: Call) {
    let running = app.hub.inflight.server_call();
    // A call whose caller (connected here) has left is abandoned, not run to its end.
    let gone = app
        .hub
        .get(&call.ctx.from)
        .map(|handle| handle.kill.clone())
        .unwrap_or_default();
    let work = dispatch(app, &call);
    tokio::pin!(work);
    let interval = call.reply.as_ref().and_then(|r| r.interval);
    let outcome = loop {
        tokio::select! {
            outcome = &mut work => break outcome,
            _ = gone.cancelled() => {
                running.finished(false);
                return;
            }
            _ = tokio::time::sleep(interval.unwrap_or(std::time::Duration::from_secs(3600))), if interval.is_some() => {
                app.peer.heartbeat(&call).await;
            }
        }
    };
    running.finished(outcome.is_ok());
    app.peer
        .reply(
            &call,
            outcome.map_err(|e| crate::rpc::peer::Rejection(e.public_message())),
        )
        .await;
}

/// Runs a call on a hosted service: `services.<service>.<function>`.
fn dispatch<'a>(app: &'a Arc<AppState>, call: &'a Call) -> BoxFuture<'a, Result<Value, Error>> {
    Box::pin(async move {
        if let Some(found) = app.exports.find(&call.method, &call.ctx.from) {
            let found = found?;
            return found.handler.call(found.function, &call.args).await;
        }
        let (service, function) = call.target()?;
        let hosted = app
            .hosted
            .get(service)
            .ok_or_else(|| not_found(service, function))?;
        hosted.call(app, &call.ctx, function, &call.args).await
    })
}

/// A token lifetime a caller asks for (`expires_in`): a positive number of seconds, at most
/// [`crate::auth::token::MAX_LIFETIME`] (a year).
pub(crate) fn token_lifetime(value: &rmpv::Value) -> Result<i64, Error> {
    value
        .as_i64()
        .filter(|s| *s > 0 && *s <= crate::auth::token::MAX_LIFETIME)
        .ok_or_else(|| {
            Error::BadRequest(
                "expires_in must be a positive number of seconds, at most one year".into(),
            )
        })
}
