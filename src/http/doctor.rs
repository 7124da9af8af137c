//! `/doctor/`: the connectivity doctor in the browser. The page gathers candidates for every
//! ICE server URL the server hands out (TURN credentials for a signed-in visitor, STUN only
//! for anonymous ones), each with a time limit, then checks a path end to end to the server's
//! own echo peer (`POST /doctor/offer`) through the relay and directly, and says in words what
//! works from the visitor's network.

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::AppState;

static PAGE: &str = include_str!("../../web/doctor.html");
static SCRIPT: &str = include_str!("../../web/doctor.js");

pub(crate) fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/doctor/", get(|| async { super::home::page(PAGE) }))
        .route(
            "/doctor",
            get(|| async { axum::response::Redirect::permanent("/doctor/") }),
        )
        .route(
            "/assets/doctor.js",
            get(|| async { super::home::asset(SCRIPT, "text/javascript") }),
        )
        .route("/doctor/offer", post(offer))
}

/// `POST /doctor/offer`: an offer with a data channel; answers with the echo peer's answer.
async fn offer(
    State(state): State<Arc<AppState>>,
    super::ClientIp(client): super::ClientIp,
    body: Result<Json<super::demo::Offer>, axum::extract::rejection::JsonRejection>,
) -> Response {
    match super::demo::offer_sdp(body) {
        Ok(sdp) => {
            super::demo::answer(crate::demo::echo::start(&state.demo, &sdp, Some(client)).await)
        }
        Err(refused) => *refused,
    }
}
