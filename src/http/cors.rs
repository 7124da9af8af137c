//! Cross-origin requests from browsers. Any origin may call the HTTP API without credentials
//! (unless `--allow-origins` names a list); credentials (the `access_token` cookie) are
//! honoured only for the server's own origin and the origins `--allow-origins` lists. A
//! request that comes from any other origin is served as anonymous even if the browser sent
//! the cookie, so another site cannot act with a visitor's session.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// `--allow-origins`: `*` (any origin, without credentials) and/or listed origins (with
/// credentials).
#[derive(Debug, Clone, PartialEq)]
pub struct AllowOrigins {
    pub any: bool,
    pub listed: Vec<String>,
}

impl Default for AllowOrigins {
    fn default() -> Self {
        Self {
            any: true,
            listed: Vec::new(),
        }
    }
}

/// `scheme://host[:port]` in lower case, or `None` for anything else.
pub(crate) fn origin_of(url: &str) -> Option<String> {
    let url = url.trim().trim_end_matches('/');
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split('/').next()?;
    let valid = matches!(scheme, "http" | "https")
        && !authority.is_empty()
        && authority
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.:[]".contains(c));
    valid.then(|| format!("{scheme}://{authority}").to_ascii_lowercase())
}

impl AllowOrigins {
    /// Parses a comma-separated list of origins and `*`.
    pub fn parse(text: &str) -> Result<Self, crate::options::InvalidValue> {
        let mut allow = AllowOrigins {
            any: false,
            listed: Vec::new(),
        };
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if item == "*" {
                allow.any = true;
            } else {
                let origin = origin_of(item).ok_or_else(|| {
                    format!("{item:?} is not an origin (https://host[:port]) or *")
                })?;
                allow.listed.push(origin);
            }
        }
        Ok(allow)
    }
}

/// Which origins get which answer.
pub struct CorsPolicy {
    allow: AllowOrigins,
    /// This server's own origins (public and local base URLs) and the listed ones.
    credentialed: Vec<String>,
}

impl CorsPolicy {
    pub(crate) fn new(allow: &AllowOrigins, own_urls: &[&str]) -> Self {
        let mut credentialed: Vec<String> = own_urls.iter().filter_map(|u| origin_of(u)).collect();
        credentialed.extend(allow.listed.iter().cloned());
        Self {
            allow: allow.clone(),
            credentialed,
        }
    }

    /// Whether a request from `origin` may carry the visitor's credentials.
    pub(crate) fn credentialed(&self, origin: &str) -> bool {
        let origin = origin.to_ascii_lowercase();
        self.credentialed.contains(&origin)
    }

    fn allowed(&self, origin: &str) -> bool {
        self.allow.any || self.credentialed(origin)
    }

    /// Whether the cookie of a request with these headers may be used: same-origin and
    /// non-browser requests carry no `Origin`, or one that is credentialed. A browser's
    /// `Sec-Fetch-Site` saying another site started the request (a link, a form, an image)
    /// refuses it too, unless that site's origin is credentialed.
    pub(crate) fn cookie_allowed(&self, headers: &HeaderMap) -> bool {
        let origin = match headers.get(header::ORIGIN).map(HeaderValue::to_str) {
            None => None,
            Some(Ok(origin)) => Some(origin),
            Some(Err(_)) => return false,
        };
        if let Some(origin) = origin
            && !self.credentialed(origin)
        {
            return false;
        }
        let site = headers
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none");
        match site {
            "same-origin" | "none" => true,
            _ => origin.is_some(),
        }
    }
}

fn decorate(response: &mut Response, policy: &CorsPolicy, origin: &HeaderValue, text: &str) {
    let headers = response.headers_mut();
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
    if !policy.allowed(text) {
        return;
    }
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    if policy.credentialed(text) {
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
}

/// The middleware as a tower layer around the routes: answers preflights and decorates
/// answers to cross-origin requests. A request without `Origin` passes straight through (no
/// boxed service or future per request, as a `from_fn` middleware would make).
#[derive(Clone)]
pub(crate) struct CorsLayer(pub(crate) Arc<CorsPolicy>);

impl<S> tower::Layer<S> for CorsLayer {
    type Service = Cors<S>;

    fn layer(&self, inner: S) -> Cors<S> {
        Cors {
            inner,
            policy: self.0.clone(),
        }
    }
}

/// The service [`CorsLayer`] makes.
#[derive(Clone)]
pub(crate) struct Cors<S> {
    inner: S,
    policy: Arc<CorsPolicy>,
}

impl<S, B> tower::Service<Request<B>> for Cors<S>
where
    S: tower::Service<Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = CorsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let Some(origin) = request.headers().get(header::ORIGIN).cloned() else {
            return CorsFuture::Inner {
                future: self.inner.call(request),
                origin: None,
            };
        };
        let preflight = request.method() == Method::OPTIONS
            && request
                .headers()
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
        if preflight {
            return CorsFuture::Ready {
                response: Some(preflight_answer(&self.policy, &origin, &request)),
            };
        }
        CorsFuture::Inner {
            future: self.inner.call(request),
            origin: Some((self.policy.clone(), origin)),
        }
    }
}

/// The answer to a preflight from `origin`: 403 for an origin not allowed, else 204 with the
/// methods and headers it may use.
fn preflight_answer<B>(
    policy: &CorsPolicy,
    origin: &HeaderValue,
    request: &Request<B>,
) -> Response {
    let text = origin.to_str().unwrap_or("");
    if !policy.allowed(text) {
        let mut refused = StatusCode::FORBIDDEN.into_response();
        refused
            .headers_mut()
            .append(header::VARY, HeaderValue::from_static("Origin"));
        return refused;
    }
    let requested = request
        .headers()
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .filter(|v| {
            v.to_str().is_ok_and(|s| {
                s.len() <= 512
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_, ".contains(c))
            })
        })
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("authorization, content-type"));
    let mut response = StatusCode::NO_CONTENT.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, OPTIONS"),
    );
    headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, requested);
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    decorate(&mut response, policy, origin, text);
    response
}

pin_project_lite::pin_project! {
    /// A preflight's answer, or the routes' answer decorated for its origin once it comes.
    #[project = CorsFutureProjection]
    pub(crate) enum CorsFuture<F> {
        Ready { response: Option<Response> },
        Inner {
            #[pin]
            future: F,
            origin: Option<(Arc<CorsPolicy>, HeaderValue)>,
        },
    }
}

impl<F, E> Future for CorsFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            CorsFutureProjection::Ready { response } => Poll::Ready(Ok(response
                .take()
                .unwrap_or_else(|| StatusCode::INTERNAL_SERVER_ERROR.into_response()))),
            CorsFutureProjection::Inner { future, origin } => {
                let mut response = std::task::ready!(future.poll(cx))?;
                if let Some((policy, origin)) = origin.take() {
                    let text = origin.to_str().unwrap_or("");
                    decorate(&mut response, &policy, &origin, text);
                }
                Poll::Ready(Ok(response))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_and_credentials() {
        let default = CorsPolicy::new(&AllowOrigins::default(), &["https://rtc.example.org/"]);
        assert!(default.allowed("http://evil.example"));
        assert!(!default.credentialed("http://evil.example"));
        assert!(default.credentialed("https://RTC.example.org"));
        let listed = AllowOrigins::parse("https://app.example.org, http://localhost:3000").unwrap();
        let policy = CorsPolicy::new(&listed, &["http://127.0.0.1:9527"]);
        assert!(!policy.allowed("http://evil.example"));
        assert!(policy.credentialed("http://localhost:3000"));
        assert!(policy.credentialed("http://127.0.0.1:9527"));
        let mut headers = HeaderMap::new();
        assert!(policy.cookie_allowed(&headers));
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert!(!policy.cookie_allowed(&headers));
        // A link or form on another site: no Origin on a GET, but the browser says who started it.
        let mut navigation = HeaderMap::new();
        navigation.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(!policy.cookie_allowed(&navigation));
        navigation.insert("sec-fetch-site", HeaderValue::from_static("same-site"));
        assert!(!policy.cookie_allowed(&navigation));
        navigation.insert("sec-fetch-site", HeaderValue::from_static("same-origin"));
        assert!(policy.cookie_allowed(&navigation));
        navigation.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        navigation.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://localhost:3000"),
        );
        assert!(policy.cookie_allowed(&navigation));
        assert!(AllowOrigins::parse("not an origin").is_err());
        assert!(AllowOrigins::parse("*").unwrap().any);
    }
}
