//! `public/hypha-login`, the service the clients' `login()` uses (`start`, `check`, `report`,
//! `logout`); its page is served by `http::login`.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use futures_util::future::BoxFuture;
use rmpv::Value;
use serde_json::json;

use super::HostedService;
use crate::AppState;
use crate::auth::{UserInfo, now_secs};
use crate::error::Error;
use crate::ids::random_id;
use crate::rpc::describe::Function;
use crate::rpc::peer::CallContext;
use crate::rpc::value::{Args, obj};
use crate::store::{LoginKey, UserRecord};

/// The `hypha-login` service.
pub(crate) struct Login;

/// How long a login key waits for its sign-in (as in Hypha).
pub(crate) const LOGIN_KEY_LIFETIME: i64 = 180;
/// Lifetime of tokens minted at sign-in unless the login asked for another.
pub(crate) const DEFAULT_TOKEN_LIFETIME: i64 = 3 * 24 * 3600;
/// Where the sign-in page is.
pub(crate) const PAGE: &str = "/public/apps/hypha-login/";

/// Sign-ins in progress one address may have, and all of them together (per instance).
const MAX_PENDING_PER_ADDRESS: usize = 10;
const MAX_PENDING_TOTAL: usize = 10_000;

/// `check` calls waiting at once (per instance); each polls the store.
const MAX_CHECKS: usize = 1_000;
/// How often a waiting `check` looks at the store.
const CHECK_POLL: Duration = Duration::from_millis(500);

/// Sign-ins started and not yet expired, by address, so no caller can fill the store with
/// login keys; and the `check` calls waiting, so none can flood the store with polls.
pub struct PendingLogins {
    started: std::sync::Mutex<HashMap<Option<std::net::IpAddr>, Vec<i64>>>,
    checks: tokio::sync::Semaphore,
    /// The keys being checked now: one waiting check per key, so the few keys one address may
    /// start cannot hold every check slot.
    checking: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Default for PendingLogins {
    fn default() -> Self {
        Self {
            started: Default::default(),
            checks: tokio::sync::Semaphore::new(MAX_CHECKS),
            checking: Default::default(),
        }
    }
}

/// A key being checked, until dropped.
struct Checking<'a>(&'a PendingLogins, String);

impl Drop for Checking<'_> {
    fn drop(&mut self) {
        let mut checking = self.0.checking.lock().unwrap_or_else(|p| p.into_inner());
        checking.remove(&self.1);
    }
}

impl PendingLogins {
    /// Marks `key` as being checked; refused while another check of it waits.
    fn check_once(&self, key: &str) -> Result<Checking<'_>, Error> {
        if key.len() > 128 {
            return Err(Error::BadRequest(
                "a login key has at most 128 characters".into(),
            ));
        }
        let mut checking = self.checking.lock().unwrap_or_else(|p| p.into_inner());
        if !checking.insert(key.to_string()) {
            return Err(Error::TooManyRequests(
                "this login key is already being checked; wait for that check to end".into(),
            ));
        }
        Ok(Checking(self, key.to_string()))
    }

    /// Counts a new sign-in from `address`, or refuses it when there are too many.
    pub(crate) fn take(&self, address: Option<std::net::IpAddr>, now: i64) -> Result<(), Error> {
        let mut started = self.started.lock().unwrap_or_else(|p| p.into_inner());
        let total: usize = started.values().map(Vec::len).sum();
        if total >= MAX_PENDING_TOTAL {
            started.retain(|_, expiries| {
                expiries.retain(|at| *at > now);
                !expiries.is_empty()
            });
        }
        let total: usize = started.values().map(Vec::len).sum();
        let mine = started
            .entry(address.map(crate::net::client_addr::address_key))
            .or_default();
        mine.retain(|at| *at > now);
        if mine.len() >= MAX_PENDING_PER_ADDRESS {
            return Err(Error::TooManyRequests(format!(
                "too many sign-ins in progress from this address (at most {MAX_PENDING_PER_ADDRESS}); finish one or wait {LOGIN_KEY_LIFETIME} s"
            )));
        }
        if total >= MAX_PENDING_TOTAL {
            return Err(Error::Unavailable(
                "too many sign-ins are in progress on this server; try again in a few minutes"
                    .into(),
            ));
        }
        mine.push(now + LOGIN_KEY_LIFETIME);
        Ok(())
    }
}

static FUNCTIONS: LazyLock<Vec<Function>> = LazyLock::new(|| {
    vec![
        Function::new(
            "start",
            "Begin a sign-in; returns the login_url to open and the key to check.",
            json!({"workspace": {"type": "string"}, "expires_in": {"type": "integer"}}),
            &[],
        ),
        Function::new(
            "check",
            "Wait for the sign-in of a key; returns the token, or the profile when asked.",
            json!({"key": {"type": "string"}, "timeout": {"type": "number"}, "profile": {"type": "boolean"}}),
            &[],
        ),
        Function::new(
            "report",
            "Complete a sign-in with a token.",
            json!({"key": {"type": "string"}, "token": {"type": "string"}}),
            &[],
        ),
        Function::new("logout", "Where to sign out.", json!({}), &[]),
    ]
});

impl HostedService for Login {
    fn name(&self) -> &'static str {
        "hypha-login"
    }

    fn summary(&self) -> &'static str {
        "Sign in to this server"
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
        Box::pin(call(app, function, ctx, args))
    }
}

/// Runs a `hypha-login` function.
async fn call(
    state: &Arc<AppState>,
    function: &str,
    ctx: &CallContext,
    args: &Args,
) -> Result<Value, Error> {
    let base = &state.public_base_url;
    match function {
        "start" => {
            let now = now_secs();
            state.pending_logins.take(ctx.peer_ip, now)?;
            let workspace = args.get_str(0, "workspace").map(str::to_string);
            let token_expires_in = match args.get(1, "expires_in") {
                None => None,
                Some(v) => Some(super::token_lifetime(v)?),
            };
            let key = LoginKey {
                key: random_id(32),
                expires_at: now + LOGIN_KEY_LIFETIME,
                workspace: workspace.clone(),
                token_expires_in,
                token: None,
                user_id: None,
            };
            state
                .store
                .create_login_key(&key, now)
                .await
                .map_err(store_error)?;
            let mut login_url = format!("{base}{PAGE}?key={}", key.key);
            if let Some(ws) = &workspace {
                login_url.push_str(&format!("&workspace={ws}"));
            }
            Ok(obj([
                ("login_url", login_url.into()),
                ("key", key.key.as_str().into()),
                (
                    "report_url",
                    format!("{base}/public/services/hypha-login/report").into(),
                ),
                (
                    "check_url",
                    format!("{base}/public/services/hypha-login/check").into(),
                ),
                (
                    "generate_url",
                    format!("{base}/public/services/hypha-login/generate").into(),
                ),
            ]))
        }
        "check" => {
            let key = args.require_str(0, "key")?;
            let timeout = args
                .get(1, "timeout")
                .and_then(|t| t.as_f64().or_else(|| t.as_i64().map(|i| i as f64)))
                .filter(|t| t.is_finite() && *t >= 0.0)
                .unwrap_or(LOGIN_KEY_LIFETIME as f64)
                .min(LOGIN_KEY_LIFETIME as f64);
            let profile = args
                .get(2, "profile")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            check(state, key, Duration::from_secs_f64(timeout), profile).await
        }
        "report" => {
            let key = args.require_str(0, "key")?;
            let token = args.require_str(1, "token")?;
            let user = state
                .tokens
                .parse(token)
                .map_err(|e| Error::Unauthorized(format!("Authentication error: {e}")))?;
            complete(state, key, token, user.id.as_str()).await?;
            Ok(Value::Nil)
        }
        "logout" => Ok(obj([("logout_url", format!("{base}{PAGE}logout").into())])),
        _ => Err(super::not_found("hypha-login", function)),
    }
}

fn store_error(e: crate::store::StoreError) -> Error {
    Error::from(e)
}

/// A pending login key, or the refusal for an unknown one.
async fn pending_key(state: &AppState, key: &str) -> Result<LoginKey, Error> {
    state
        .store
        .login_key(key)
        .await
        .map_err(store_error)?
        .ok_or_else(|| {
            Error::NotFound("Invalid login key: it is unknown or was already used".into())
        })
}

pub(crate) async fn complete(
    state: &AppState,
    key: &str,
    token: &str,
    user_id: &str,
) -> Result<(), Error> {
    let pending = pending_key(state, key).await?;
    if pending.expires_at < now_secs() {
        return Err(Error::BadRequest(
            "The login key has expired; start the sign-in again".into(),
        ));
    }
    if !state
        .store
        .complete_login_key(key, token, user_id)
        .await
        .map_err(store_error)?
    {
        return Err(Error::BadRequest("This login key was already used".into()));
    }
    Ok(())
}

/// Polls the store until the key's sign-in completes, it expires, or `timeout` passes.
async fn check(
    state: &AppState,
    key: &str,
    timeout: Duration,
    profile: bool,
) -> Result<Value, Error> {
    let Ok(_waiting) = state.pending_logins.checks.try_acquire() else {
        return Err(Error::Unavailable(format!(
            "too many sign-in checks are waiting on this server (at most {MAX_CHECKS}); try again shortly"
        )));
    };
    let _checking = state.pending_logins.check_once(key)?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let pending = pending_key(state, key).await?;
        if let Some(token) = pending.token {
            state
                .store
                .delete_login_key(key)
                .await
                .map_err(store_error)?;
            if !profile {
                return Ok(token.as_str().into());
            }
            let user = state
                .tokens
                .parse(&token)
                .map_err(|e| Error::Internal(e.to_string()))?;
            return Ok(obj([
                ("token", token.as_str().into()),
                (
                    "workspace",
                    user.scope
                        .current
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_else(|| user.own_workspace())
                        .into(),
                ),
                (
                    "expires_at",
                    user.expires_at.map(Value::from).unwrap_or(Value::Nil),
                ),
                (
                    "email",
                    user.email.clone().map(Value::from).unwrap_or(Value::Nil),
                ),
                ("user_id", user.id.as_str().into()),
            ]));
        }
        if pending.expires_at < now_secs() {
            state
                .store
                .delete_login_key(key)
                .await
                .map_err(store_error)?;
            return Err(Error::BadRequest(
                "The login key has expired; start the sign-in again".into(),
            ));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Timeout(
                "Login timeout: nobody signed in with this key yet".into(),
            ));
        }
        tokio::time::sleep(CHECK_POLL.min(deadline - tokio::time::Instant::now())).await;
    }
}

/// The token a local user gets at sign-in.
pub(crate) fn token_for(
    state: &AppState,
    user: &UserRecord,
    workspace: Option<&str>,
    expires_in: Option<i64>,
) -> Result<String, Error> {
    let lifetime = expires_in.unwrap_or(DEFAULT_TOKEN_LIFETIME);
    let id = crate::ids::UserId::parse(user.id.as_str())
        .map_err(|e| Error::Internal(format!("a stored user id is not valid: {e}")))?;
    let mut info = UserInfo::new(id, user.roles.clone(), Some(now_secs() + lifetime));
    info.email = Some(user.email.clone());
    if let Some(ws) = workspace {
        let ws =
            crate::ids::WorkspaceId::parse(ws).map_err(|e| Error::BadRequest(e.to_string()))?;
        let permission = state
            .workspaces
            .permission(&info, ws.as_str())
            .filter(|_| ws != "public");
        let Some(permission) = permission else {
            return Err(Error::PermissionDenied(format!(
                "{} has no access to workspace {ws}",
                user.email
            )));
        };
        info.scope.workspaces.insert(ws.clone(), permission);
        info.scope.current = Some(ws);
    }
    Ok(state.tokens.issue(&info, lifetime))
}
