//! `/demo/`: Start, Stop and Disconnect, a text box and a speed slider, the video, the
//! connection's figures as labelled fields with a minute of frame rate and bitrate, and the
//! phases of the connection (the page is `web/demo.html` and `web/demo.js`);
//! `POST /demo/offer` answers the page's offer.

use std::sync::{Arc, LazyLock};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use crate::AppState;

pub(crate) fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/demo/", get(page))
        .route(
            "/assets/demo.js",
            get(|| async {
                super::home::asset(include_str!("../../web/demo.js"), "text/javascript")
            }),
        )
        .route("/demo/offer", post(offer))
}

#[derive(Deserialize)]
pub(crate) struct Offer {
    sdp: String,
    #[serde(rename = "type")]
    kind: String,
}

/// A JSON refusal with the status that goes with it.
fn refuse(status: StatusCode, detail: String) -> Response {
    (status, Json(serde_json::json!({ "detail": detail }))).into_response()
}

/// The SDP of a page's `{"sdp": ..., "type": "offer"}` body, or the refusal (400) that says
/// what is wrong with it.
pub(crate) fn offer_sdp(
    body: Result<Json<Offer>, axum::extract::rejection::JsonRejection>,
) -> Result<String, Box<Response>> {
    let offer = match body {
        Ok(Json(offer)) => offer,
        Err(e) => {
            return Err(Box::new(refuse(
                StatusCode::BAD_REQUEST,
                format!(
                    "the body must be JSON {{\"sdp\": ..., \"type\": \"offer\"}}: {}",
                    e.body_text()
                ),
            )));
        }
    };
    if offer.kind != "offer" {
        return Err(Box::new(refuse(
            StatusCode::BAD_REQUEST,
            "type must be \"offer\"".into(),
        )));
    }
    Ok(offer.sdp)
}

/// The answer to a page's offer: `{"sdp": ..., "type": "answer"}`, or the refusal in words.
pub(crate) fn answer(outcome: Result<String, crate::error::Error>) -> Response {
    match outcome {
        Ok(sdp) => Json(serde_json::json!({"sdp": sdp, "type": "answer"})).into_response(),
        Err(e) => refuse(super::status(&e), e.public_message()),
    }
}

async fn offer(
    State(state): State<Arc<AppState>>,
    super::ClientIp(client): super::ClientIp,
    body: Result<Json<Offer>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let sdp = match offer_sdp(body) {
        Ok(sdp) => sdp,
        Err(refused) => return *refused,
    };
    answer(
        crate::demo::peer::start(
            &state.demo,
            &sdp,
            Arc::new(crate::auth::UserInfo::http_anonymous()),
            Some(client),
        )
        .await,
    )
}

/// The page with its limits filled in, built on first use.
static PAGE_HTML: LazyLock<String> = LazyLock::new(|| {
    include_str!("../../web/demo.html")
        .replace("{MAX_TEXT}", &crate::demo::controls::MAX_TEXT.to_string())
});

async fn page() -> Response {
    super::home::page(PAGE_HTML.as_str())
}
