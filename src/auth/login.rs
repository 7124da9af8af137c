//! The `public/hypha-login` service the clients' `login()` uses (`start`, `check`, `report`,
//! `logout`), and its sign-in page at `/public/apps/hypha-login/` (also `/login`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Form, Router};
use rmpv::Value;
use serde::Deserialize;

use super::UserInfo;
use super::accounts::SignInError;
use crate::AppState;
use crate::error::Error;
use crate::rpc::value::{Args, obj};
use crate::store::{LoginKey, UserRecord};
use crate::workspace::manager::Function;

/// How long a login key waits for its sign-in (as in Hypha).
pub const LOGIN_KEY_LIFETIME: i64 = 180;
/// Lifetime of tokens minted at sign-in unless the login asked for another.
pub const DEFAULT_TOKEN_LIFETIME: i64 = 3 * 24 * 3600;
const PAGE: &str = "/public/apps/hypha-login/";

/// Sign-ins in progress one address may have, and all of them together (per instance).
const MAX_PENDING_PER_ADDRESS: usize = 10;
const MAX_PENDING_TOTAL: usize = 10_000;

/// Sign-ins started and not yet expired, by address, so no caller can fill the store with
/// login keys.
#[derive(Default)]
pub struct PendingLogins {
    started: std::sync::Mutex<HashMap<Option<std::net::IpAddr>, Vec<i64>>>,
}

impl PendingLogins {
    /// Counts a new sign-in from `address`, or refuses it when there are too many.
    pub fn take(&self, address: Option<std::net::IpAddr>, now: i64) -> Result<(), Error> {
        let mut started = self.started.lock().unwrap_or_else(|p| p.into_inner());
        let total: usize = started.values().map(Vec::len).sum();
        if total >= MAX_PENDING_TOTAL {
            started.retain(|_, expiries| {
                expiries.retain(|at| *at > now);
                !expiries.is_empty()
            });
        }
        let total: usize = started.values().map(Vec::len).sum();
        let mine = started.entry(address).or_default();
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

/// The functions of the hosted `hypha-login` service, with their schemas.
pub const FUNCTIONS: &[Function] = &[
    Function {
        name: "start",
        doc: "Begin a sign-in; returns the login_url to open and the key to check.",
        params: r#"{"workspace":{"type":"string"},"expires_in":{"type":"integer"}}"#,
        required: &[],
    },
    Function {
        name: "check",
        doc: "Wait for the sign-in of a key; returns the token, or the profile when asked.",
        params: r#"{"key":{"type":"string"},"timeout":{"type":"number"},"profile":{"type":"boolean"}}"#,
        required: &[],
    },
    Function {
        name: "report",
        doc: "Complete a sign-in with a token.",
        params: r#"{"key":{"type":"string"},"token":{"type":"string"}}"#,
        required: &[],
    },
    Function {
        name: "logout",
        doc: "Where to sign out.",
        params: "{}",
        required: &[],
    },
];

/// Runs a `hypha-login` function.
pub async fn call(
    state: &Arc<AppState>,
    function: &str,
    ctx: &crate::rpc::peer::CallContext,
    args: &Args,
) -> Result<Value, Error> {
    let base = &state.public_base_url;
    match function {
        "start" => {
            let now = super::now_secs();
            state.pending_logins.take(ctx.peer_ip, now)?;
            let workspace = args.get_str(0, "workspace").map(str::to_string);
            let token_expires_in = match args.get(1, "expires_in") {
                None => None,
                Some(v) => Some(
                    v.as_i64()
                        .filter(|s| *s > 0 && *s <= 365 * 24 * 3600)
                        .ok_or_else(|| {
                            Error::BadRequest(
                                "expires_in must be a positive number of seconds, at most one year"
                                    .into(),
                            )
                        })?,
                ),
            };
            let key = LoginKey {
                key: super::random_id(32),
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
        _ => Err(Error::NotFound(format!(
            "Method not found: services.hypha-login.{function}"
        ))),
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

async fn complete(state: &AppState, key: &str, token: &str, user_id: &str) -> Result<(), Error> {
    let pending = pending_key(state, key).await?;
    if pending.expires_at < super::now_secs() {
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
        if pending.expires_at < super::now_secs() {
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
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The token a local user gets at sign-in.
pub fn token_for(
    state: &AppState,
    user: &UserRecord,
    workspace: Option<&str>,
    expires_in: Option<i64>,
) -> Result<String, String> {
    let lifetime = expires_in.unwrap_or(DEFAULT_TOKEN_LIFETIME);
    let id = crate::ids::UserId::parse(user.id.as_str()).map_err(|e| e.to_string())?;
    let mut info = UserInfo::new(id, user.roles.clone(), Some(super::now_secs() + lifetime));
    info.email = Some(user.email.clone());
    if let Some(ws) = workspace {
        let ws = crate::ids::WorkspaceId::parse(ws).map_err(|e| e.to_string())?;
        let permission = info.permission(ws.as_str()).filter(|_| ws != "public");
        let Some(permission) = permission else {
            return Err(format!("{} has no access to workspace {ws}", user.email));
        };
        info.scope.workspaces.insert(ws.clone(), permission);
        info.scope.current = Some(ws);
    }
    Ok(state.tokens.issue(&info, lifetime))
}

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/login", get(|| async { Redirect::to(PAGE) }))
        .route(PAGE, get(page).post(sign_in))
        .route("/public/apps/hypha-login/logout", get(logout))
}

#[derive(Deserialize)]
struct PageQuery {
    key: Option<String>,
    workspace: Option<String>,
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn render(key: Option<&str>, workspace: Option<&str>, message: Option<&str>, done: bool) -> String {
    let body = if done {
        format!(
            "<p id=\"result\" class=\"ok\">{}</p>",
            escape(message.unwrap_or("Signed in."))
        )
    } else {
        format!(
            r#"{message}<form method="post" action="{PAGE}">
  <input type="hidden" name="key" value="{key}">
  <input type="hidden" name="workspace" value="{workspace}">
  <label>Email <input type="email" name="email" autocomplete="username" required autofocus></label>
  <label>Password <input type="password" name="password" autocomplete="current-password" required></label>
  <button type="submit">Sign in</button>
</form>"#,
            message = message
                .map(|m| format!("<p id=\"result\" class=\"error\">{}</p>", escape(m)))
                .unwrap_or_default(),
            key = escape(key.unwrap_or("")),
            workspace = escape(workspace.unwrap_or("")),
        )
    };
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>Sign in · hypha-rtc</title><style>
body{{font-family:system-ui,sans-serif;max-width:22rem;margin:4rem auto;padding:0 1rem}}
label{{display:block;margin:.8rem 0}} input{{display:block;width:100%;padding:.4rem;margin-top:.2rem}}
button{{padding:.5rem 1.2rem}} .error{{color:#b00020}} .ok{{color:#05670f}}
</style></head><body><h1>Sign in</h1>{body}</body></html>"#
    )
}

async fn page(Query(query): Query<PageQuery>) -> Html<String> {
    Html(render(
        query.key.as_deref(),
        query.workspace.as_deref(),
        None,
        false,
    ))
}

#[derive(Deserialize)]
struct SignInForm {
    email: String,
    password: String,
    #[serde(default)]
    key: String,
    #[serde(default)]
    workspace: String,
}

async fn sign_in(
    State(state): State<Arc<AppState>>,
    crate::http::ClientIp(address): crate::http::ClientIp,
    headers: HeaderMap,
    Form(form): Form<SignInForm>,
) -> Response {
    let key = Some(form.key.as_str()).filter(|k| !k.is_empty());
    let workspace = Some(form.workspace.as_str()).filter(|w| !w.is_empty());
    let refuse = |status: StatusCode, message: &str| {
        (status, Html(render(key, workspace, Some(message), false))).into_response()
    };
    let user = match state
        .accounts
        .sign_in(form.email.trim(), &form.password, address)
        .await
    {
        Ok(user) => user,
        Err(SignInError::LockedOut(s)) => {
            return refuse(
                StatusCode::TOO_MANY_REQUESTS,
                &SignInError::LockedOut(s).to_string(),
            );
        }
        Err(SignInError::Store(e)) => {
            tracing::error!(error = %e, "sign-in failed on the store");
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "Sign-in is unavailable right now",
            );
        }
        Err(e) => return refuse(StatusCode::UNAUTHORIZED, &e.to_string()),
    };
    let pending = match key {
        Some(k) => match state.store.login_key(k).await {
            Ok(Some(pending)) => Some(pending),
            Ok(None) => {
                return refuse(
                    StatusCode::NOT_FOUND,
                    "Invalid login key: it is unknown or was already used",
                );
            }
            Err(_) => {
                return refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Sign-in is unavailable right now",
                );
            }
        },
        None => None,
    };
    let requested_ws = pending
        .as_ref()
        .and_then(|p| p.workspace.as_deref())
        .or(workspace);
    let token = match token_for(
        &state,
        &user,
        requested_ws,
        pending.as_ref().and_then(|p| p.token_expires_in),
    ) {
        Ok(token) => token,
        Err(message) => return refuse(StatusCode::FORBIDDEN, &message),
    };
    if let Some(k) = key
        && let Err(e) = complete(&state, k, &token, &user.id).await
    {
        return refuse(crate::http::status(&e), &e.public_message());
    }
    tracing::info!(user = %user.id, "signed in");
    let secure = state.public_base_url.starts_with("https://")
        || headers
            .get("x-forwarded-proto")
            .is_some_and(|v| v == "https");
    let cookie = format!(
        "access_token={token}; Path=/; HttpOnly; SameSite=Lax; Max-Age={}{}",
        pending
            .as_ref()
            .and_then(|p| p.token_expires_in)
            .unwrap_or(DEFAULT_TOKEN_LIFETIME),
        if secure { "; Secure" } else { "" }
    );
    let mut response = Html(render(
        None,
        None,
        Some(&format!(
            "Signed in as {}. You can close this window.",
            user.email
        )),
        true,
    ))
    .into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

async fn logout() -> Response {
    let mut response = Html(render(None, None, Some("Signed out."), true)).into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("access_token=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0"),
    );
    response
}
