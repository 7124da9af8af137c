//! `/setup`: the first run's one-time link. While no account exists, the server prints a link
//! with a key at start-up; the page it opens creates the first admin, through the same checks
//! as `hypha-rtc user add`. The key works once and expires; once any account exists the page
//! creates nothing.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Form, Router};
use serde::Deserialize;

use crate::AppState;
use crate::auth::accounts::{NewAccountError, create_account};

pub(crate) fn router() -> Router<Arc<AppState>> {
    Router::new().route("/setup", get(page).post(create))
}

#[derive(Deserialize)]
struct KeyQuery {
    #[serde(default)]
    key: String,
}

#[derive(Deserialize)]
struct SetupForm {
    #[serde(default)]
    key: String,
    #[serde(default)]
    email: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    confirm: String,
}

const GONE: &str = "This setup link does not work: it was used already, it expired, or an account exists. \
Create accounts with <code>hypha-rtc user add</code>; a server that starts while no account exists prints a new link.";

fn render(body: &str) -> String {
    super::home::narrow_page("First run", "Create the first admin", body)
}

fn form(key: &str, email: &str, message: Option<&str>) -> String {
    let message = message
        .map(|m| {
            format!(
                r#"<p id="result" class="message bad">{}</p>"#,
                super::escape(m)
            )
        })
        .unwrap_or_default();
    render(&format!(
        r#"<p class="lead">No account exists on this server yet. The account you create here is its administrator;
this link then stops working.</p>{message}
<form class="stack" method="post" action="/setup">
<input type="hidden" name="key" value="{key}">
<label>Email <input type="email" name="email" value="{email}" autocomplete="username" required autofocus></label>
<label>Password (at least {min} characters) <input type="password" name="password" autocomplete="new-password" minlength="{min}" required></label>
<label>Password again <input type="password" name="confirm" autocomplete="new-password" minlength="{min}" required></label>
<div class="actions"><button class="button" type="submit">Create the admin account</button></div>
</form>"#,
        key = super::escape(key),
        email = super::escape(email),
        min = crate::auth::accounts::MIN_PASSWORD_CHARS,
    ))
}

fn gone() -> Response {
    (
        StatusCode::NOT_FOUND,
        super::home::page(render(&format!(
            r#"<p id="result" class="message bad">{GONE}</p>"#
        ))),
    )
        .into_response()
}

/// Whether the setup may still run: a valid key, and no account yet.
async fn open(state: &AppState, key: &str) -> bool {
    if !state.first_run.valid(key) {
        return false;
    }
    match state.store.has_users().await {
        Ok(false) => true,
        Ok(true) => {
            state.first_run.close();
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "the first-run page cannot read the accounts");
            false
        }
    }
}

async fn page(State(state): State<Arc<AppState>>, Query(query): Query<KeyQuery>) -> Response {
    if !open(&state, &query.key).await {
        return gone();
    }
    super::home::page(form(&query.key, "", None))
}

async fn create(State(state): State<Arc<AppState>>, Form(form_data): Form<SetupForm>) -> Response {
    if !open(&state, &form_data.key).await {
        return gone();
    }
    let again = |status: StatusCode, message: &str| {
        (
            status,
            super::home::page(form(&form_data.key, &form_data.email, Some(message))),
        )
            .into_response()
    };
    if form_data.password != form_data.confirm {
        return again(StatusCode::BAD_REQUEST, "The two passwords differ.");
    }
    if let Err(e) = crate::auth::accounts::checked_email(&form_data.email) {
        return again(StatusCode::BAD_REQUEST, &e.to_string());
    }
    if form_data.password.chars().count() < crate::auth::accounts::MIN_PASSWORD_CHARS {
        return again(
            StatusCode::BAD_REQUEST,
            &NewAccountError::ShortPassword.to_string(),
        );
    }
    // The key is spent before the account is written: two submissions make one admin.
    if !state.first_run.take(&form_data.key) {
        return gone();
    }
    let created = create_account(
        &state.store,
        &form_data.email,
        &form_data.password,
        vec!["admin".to_string()],
        crate::auth::now_secs(),
    )
    .await;
    match created {
        Ok(user) => {
            tracing::info!(user = %user.id, "the first admin was created through the setup link");
            super::home::page(render(&format!(
                r#"<p id="result" class="message ok">The admin account {} is ready.</p>
<div class="actions"><a class="button" href="/login">Sign in</a><a class="button secondary" href="/">Home</a></div>"#,
                super::escape(&user.email)
            )))
        }
        Err(NewAccountError::Store(e)) => {
            tracing::error!(error = %e, "the first admin could not be stored");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                super::home::page(render(
                    r#"<p id="result" class="message bad">The account could not be stored; the link is spent. Restart the server for a new one, or use <code>hypha-rtc user add</code>.</p>"#,
                )),
            )
                .into_response()
        }
        Err(e) => (
            StatusCode::BAD_REQUEST,
            super::home::page(render(&format!(
                r#"<p id="result" class="message bad">{}</p>"#,
                super::escape(&e.to_string())
            ))),
        )
            .into_response(),
    }
}
