//! `/admin/`: accounts for admins. The page lists the users and adds, disables and re-passwords
//! them, revokes tokens and shows the credential audit (issuance per hour over a day, and per
//! user). Its JSON API (`/api/admin/...`) answers admins only, and every action goes through
//! the same checks as the command line and RPC.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::UserInfo;
use crate::auth::accounts::{NewAccountError, checked_email, create_account};
use crate::error::Error;

static PAGE: &str = include_str!("../../web/admin.html");
static SCRIPT: &str = include_str!("../../web/admin.js");

/// Users listed in the audit's per-user table at most.
const AUDIT_USERS: i64 = 50;

pub(crate) fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/admin/", get(|| async { super::home::page(PAGE) }))
        .route(
            "/admin",
            get(|| async { axum::response::Redirect::permanent("/admin/") }),
        )
        .route(
            "/assets/admin.js",
            get(|| async { super::home::asset(SCRIPT, "text/javascript") }),
        )
        .route("/api/admin/users", get(users).post(add))
        .route("/api/admin/users/disable", post(disable))
        .route("/api/admin/users/password", post(password))
        .route("/api/admin/revoke", post(revoke))
        .route("/api/admin/audit", get(audit))
}

/// The caller, if an admin; otherwise the refusal.
async fn admin(state: &AppState, headers: &HeaderMap) -> Result<Arc<UserInfo>, Error> {
    let user = super::caller(state, headers).await?;
    if user.is_anonymous() {
        return Err(Error::Unauthorized(
            "sign in as an admin to manage accounts".into(),
        ));
    }
    if !user.is_admin() {
        return Err(Error::PermissionDenied(
            "only admins manage accounts".into(),
        ));
    }
    Ok(user)
}

async fn users(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, Error> {
    admin(&state, &headers).await?;
    let users = state.store.users().await?;
    Ok(Json(json!(
        users
            .into_iter()
            .map(|u| json!({
                "id": u.id,
                "email": u.email,
                "roles": u.roles,
                "created_at": u.created_at,
                "disabled": u.disabled_at.is_some(),
            }))
            .collect::<Vec<_>>()
    )))
}

#[derive(Deserialize)]
struct NewUser {
    email: String,
    password: String,
    #[serde(default)]
    admin: bool,
}

fn account_error(e: NewAccountError) -> Error {
    match e {
        NewAccountError::Store(e) => Error::from(e),
        NewAccountError::Exists(_) => Error::BadRequest(e.to_string()),
        other => Error::BadRequest(other.to_string()),
    }
}

async fn add(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Json<NewUser>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, Error> {
    let by = admin(&state, &headers).await?;
    let new = json_body(body, "{\"email\", \"password\", \"admin\"}")?;
    let roles = if new.admin {
        vec!["admin".to_string()]
    } else {
        Vec::new()
    };
    let user = create_account(
        &state.store,
        &new.email,
        &new.password,
        roles,
        crate::auth::now_secs(),
    )
    .await
    .map_err(account_error)?;
    tracing::info!(user = %user.id, by = %by.id, "an admin added a user");
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": user.id, "email": user.email, "roles": user.roles})),
    )
        .into_response())
}

#[derive(Deserialize)]
struct ByEmail {
    email: String,
    #[serde(default)]
    password: Option<String>,
}

fn json_body<T>(
    body: Result<Json<T>, axum::extract::rejection::JsonRejection>,
    shape: &str,
) -> Result<T, Error> {
    body.map(|Json(t)| t)
        .map_err(|e| Error::BadRequest(format!("the body must be JSON {shape}: {}", e.body_text())))
}

async fn disable(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Json<ByEmail>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, Error> {
    let by = admin(&state, &headers).await?;
    let request = json_body(body, "{\"email\"}")?;
    let email = checked_email(&request.email).map_err(account_error)?;
    if by.email.as_deref() == Some(email.as_str()) {
        return Err(Error::BadRequest(
            "you cannot disable your own account here (another admin can)".into(),
        ));
    }
    if !state
        .store
        .disable_user(&email, crate::auth::now_secs())
        .await?
    {
        return Err(Error::NotFound(format!("no user with the email {email}")));
    }
    tracing::info!(%email, by = %by.id, "an admin disabled a user");
    // Its connections close within seconds (the accounts watcher), on every instance.
    Ok(Json(json!({"disabled": email})))
}

async fn password(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Json<ByEmail>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, Error> {
    let by = admin(&state, &headers).await?;
    let request = json_body(body, "{\"email\", \"password\"}")?;
    let email = checked_email(&request.email).map_err(account_error)?;
    let password = request.password.unwrap_or_default();
    if !crate::auth::accounts::set_password(&state.store, &email, &password)
        .await
        .map_err(account_error)?
    {
        return Err(Error::NotFound(format!("no user with the email {email}")));
    }
    tracing::info!(%email, by = %by.id, "an admin set a new password");
    Ok(Json(json!({"password_set": email})))
}

#[derive(Deserialize)]
struct Revocation {
    token: String,
}

async fn revoke(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Json<Revocation>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, Error> {
    let by = admin(&state, &headers).await?;
    let request = json_body(body, "{\"token\"}")?;
    crate::services::manager::revoke_token(&state, &by, request.token.trim()).await?;
    tracing::info!(by = %by.id, "an admin revoked a token");
    Ok(Json(json!({"revoked": true})))
}

async fn audit(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, Error> {
    admin(&state, &headers).await?;
    let now = crate::auth::now_secs();
    let since = (now / 3600 - 23) * 3600;
    let per_hour = state.store.ice_issuances_per_hour(since).await?;
    let by_user = state
        .store
        .ice_issuances_by_user(since, AUDIT_USERS)
        .await?;
    Ok(Json(json!({
        "since": since,
        "per_hour": per_hour,
        "by_user": by_user
            .into_iter()
            .map(|(id, email, count)| json!({"user_id": id, "email": email, "issued": count}))
            .collect::<Vec<_>>(),
    })))
}
