//! The sign-in page of `hypha-login`, at `/public/apps/hypha-login/` (also `/login`): a local
//! user signs in with email and password, which completes a pending login key (the clients'
//! `login()`) and sets an `access_token` cookie.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Form, Router};
use serde::Deserialize;

use crate::AppState;
use crate::auth::accounts::SignInError;
use crate::services::login::{DEFAULT_TOKEN_LIFETIME, PAGE, complete, token_for};

pub(crate) fn router() -> Router<Arc<AppState>> {
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

fn render(key: Option<&str>, workspace: Option<&str>, message: Option<&str>, done: bool) -> String {
    let body = if done {
        format!(
            "<p id=\"result\" class=\"message ok\">{}</p>",
            super::escape(message.unwrap_or("Signed in."))
        )
    } else {
        format!(
            r#"{message}<form class="stack" method="post" action="{PAGE}">
  <input type="hidden" name="key" value="{key}">
  <input type="hidden" name="workspace" value="{workspace}">
  <label>Email <input type="email" name="email" autocomplete="username" required autofocus></label>
  <label>Password <input type="password" name="password" autocomplete="current-password" required></label>
  <div class="actions"><button class="button" type="submit">Sign in</button></div>
</form>"#,
            message = message
                .map(|m| format!(
                    "<p id=\"result\" class=\"message bad\">{}</p>",
                    super::escape(m)
                ))
                .unwrap_or_default(),
            key = super::escape(key.unwrap_or("")),
            workspace = super::escape(workspace.unwrap_or("")),
        )
    };
    super::home::narrow_page("Sign in", "Sign in", &body)
}

async fn page(Query(query): Query<PageQuery>) -> Response {
    super::home::page(render(
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
    super::ClientIp(address): super::ClientIp,
    headers: HeaderMap,
    Form(form): Form<SignInForm>,
) -> Response {
    let key = Some(form.key.as_str()).filter(|k| !k.is_empty());
    let workspace = Some(form.workspace.as_str()).filter(|w| !w.is_empty());
    let refuse = |status: StatusCode, message: &str| {
        (
            status,
            super::home::page(render(key, workspace, Some(message), false)),
        )
            .into_response()
    };
    // A form another site (or an app's sandboxed page) posts would sign the visitor in to an
    // account of its choosing: only this server's own pages may post it.
    if !state.cors.cookie_allowed(&headers) {
        return refuse(
            StatusCode::FORBIDDEN,
            "Sign in from this server's own page: a form from another site is refused",
        );
    }
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
        Err(e) => return refuse(super::status(&e), &e.public_message()),
    };
    if let Some(k) = key
        && let Err(e) = complete(&state, k, &token, &user.id).await
    {
        return refuse(super::status(&e), &e.public_message());
    }
    tracing::info!(user = %user.id, "signed in");
    let secure = state.public_base_url.starts_with("https://")
        || headers
            .get("x-forwarded-proto")
            .is_some_and(|v| v == "https");
    let cookie = format!(
        "access_token={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        pending
            .as_ref()
            .and_then(|p| p.token_expires_in)
            .unwrap_or(DEFAULT_TOKEN_LIFETIME),
        if secure { "; Secure" } else { "" }
    );
    let mut response = super::home::page(render(
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
    let mut response = super::home::page(render(None, None, Some("Signed out."), true));
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("access_token=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    response
}
