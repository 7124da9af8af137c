//! The manager's per-workspace data, with Hypha's function names and results:
//! `get_env`/`set_env`, `log_event`/`get_events`/`get_event_stats` and
//! `register_service_type`/`get_service_type`/`list_service_types`. Kept in the store, so
//! every instance sees the same; each kind is bounded per workspace, lower for anonymous
//! callers, and the data of temporary (anonymous) workspaces expires after a day.

use rmpv::Value;
use serde_json::json;

use crate::AppState;
use crate::auth::Permission;
use crate::error::Error;
use crate::rpc::describe::Function;
use crate::rpc::peer::CallContext;
use crate::rpc::value::{self, Args, get, get_str, obj};
use crate::store::workspace_data::{EventFilter, EventRow, Write};

use super::manager::need;

/// How much a workspace may hold, and how large one value may be.
struct Caps {
    env_names: i64,
    events: i64,
    service_types: i64,
    /// Largest value (as JSON text) of a variable, an event's data or a service type.
    value_bytes: usize,
}

const REGISTERED: Caps = Caps {
    env_names: 256,
    events: 100_000,
    service_types: 256,
    value_bytes: 64 * 1024,
};

const ANONYMOUS: Caps = Caps {
    env_names: 16,
    events: 200,
    service_types: 16,
    value_bytes: 4 * 1024,
};

/// How long the data of a temporary (anonymous) workspace is kept.
const TEMPORARY_LIFETIME_SECS: i64 = 24 * 3600;

/// Most events one `get_events` call returns (oldest first).
pub(crate) const MAX_EVENTS_RETURNED: i64 = 1000;

/// The functions of this module, for the manager's table.
pub(crate) fn functions() -> Vec<Function> {
    vec![
        Function::new(
            "set_env",
            "Set an environment variable of the current workspace (None deletes it).",
            json!({"key":{"type":"string"},"value":{"description":"Any JSON value"}}),
            &["key", "value"],
        ),
        Function::new(
            "get_env",
            "Read an environment variable of the current workspace, or all of them without a key.",
            json!({"key":{"type":"string"}}),
            &[],
        ),
        Function::new(
            "log_event",
            "Record an event in the current workspace.",
            json!({"event_type":{"type":"string","description":"No spaces"},"data":{"description":"Any JSON value"}}),
            &["event_type"],
        ),
        Function::new(
            "get_events",
            "Your events in the current workspace, oldest first (at most 1000).",
            json!({"event_type":{"type":"string"},"start_time":{"description":"Seconds since the epoch or an ISO 8601 time"},"end_time":{"description":"Seconds since the epoch or an ISO 8601 time"}}),
            &[],
        ),
        Function::new(
            "get_event_stats",
            "How many of your events of each type the current workspace holds.",
            json!({"event_type":{"type":"string"},"start_time":{"description":"Seconds since the epoch or an ISO 8601 time"},"end_time":{"description":"Seconds since the epoch or an ISO 8601 time"}}),
            &[],
        ),
        Function::new(
            "register_service_type",
            "Register a service type in the current workspace.",
            json!({"type_info":{"type":"object","description":"id, name, definition, description, config, docs"}}),
            &["type_info"],
        ),
        Function::new(
            "get_service_type",
            "Read a service type: id or workspace/id.",
            json!({"type_id":{"type":"string"}}),
            &["type_id"],
        ),
        Function::new(
            "list_service_types",
            "List the service types of a workspace (default the current one).",
            json!({"workspace":{"type":"string"}}),
            &[],
        ),
    ]
}

/// Runs one of this module's functions; `None` when `function` is not one of them.
pub(crate) async fn call(
    state: &AppState,
    ctx: &CallContext,
    function: &str,
    args: &Args,
) -> Option<Result<Value, Error>> {
    Some(match function {
        "set_env" => set_env(state, ctx, args).await,
        "get_env" => get_env(state, ctx, args).await,
        "log_event" => log_event(state, ctx, args).await,
        "get_events" => get_events(state, ctx, args).await,
        "get_event_stats" => get_event_stats(state, ctx, args).await,
        "register_service_type" => register_service_type(state, ctx, args).await,
        "get_service_type" => get_service_type(state, ctx, args).await,
        "list_service_types" => list_service_types(state, ctx, args).await,
        _ => return None,
    })
}

fn caps(ctx: &CallContext) -> &'static Caps {
    if ctx.user.is_anonymous() {
        &ANONYMOUS
    } else {
        &REGISTERED
    }
}

/// When a row written to `workspace` now expires: temporary workspaces only.
fn expiry(workspace: &str) -> Option<i64> {
    workspace
        .starts_with(crate::auth::user::ANONYMOUS_WORKSPACE_PREFIX)
        .then(|| crate::auth::now_secs() + TEMPORARY_LIFETIME_SECS)
}

/// A value as JSON text within the caller's size cap.
fn json_text(value: &Value, what: &str, caps: &Caps) -> Result<String, Error> {
    let text = value::to_json(value).to_string();
    if text.len() > caps.value_bytes {
        return Err(Error::PayloadTooLarge(format!(
            "{what} may take at most {} bytes as JSON (this one takes {})",
            caps.value_bytes,
            text.len()
        )));
    }
    Ok(text)
}

fn from_json_text(text: &str) -> Value {
    serde_json::from_str::<serde_json::Value>(text)
        .map(|j| value::from_json(&j))
        .unwrap_or(Value::Nil)
}

fn clip(text: &str) -> String {
    text.chars().take(64).collect()
}

async fn set_env(state: &AppState, ctx: &CallContext, args: &Args) -> Result<Value, Error> {
    need(state, &ctx.user, &ctx.ws, Permission::ReadWrite)?;
    let key = args.require_str(0, "key")?;
    if key.is_empty() || key.len() > 128 || key.chars().any(char::is_control) {
        return Err(Error::BadRequest(
            "an environment variable's name has 1 to 128 characters, none of them control characters".into(),
        ));
    }
    let caps = caps(ctx);
    let text = match args.get(1, "value") {
        None | Some(Value::Nil) => None,
        Some(v) => Some(json_text(v, "an environment variable", caps)?),
    };
    let added = state
        .store
        .set_env(
            &ctx.ws,
            key,
            text.as_deref(),
            expiry(&ctx.ws),
            caps.env_names,
        )
        .await?;
    if added == Write::Full {
        return Err(Error::TooManyRequests(format!(
            "workspace {} holds the most environment variables it may ({}); delete one first",
            ctx.ws, caps.env_names
        )));
    }
    Ok(Value::Nil)
}

async fn get_env(state: &AppState, ctx: &CallContext, args: &Args) -> Result<Value, Error> {
    need(state, &ctx.user, &ctx.ws, Permission::ReadWrite)?;
    let env = state.store.env(&ctx.ws).await?;
    match args.get_str(0, "key") {
        None => Ok(Value::Map(
            env.iter()
                .map(|(k, v)| (k.as_str().into(), from_json_text(v)))
                .collect(),
        )),
        Some(key) => env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| from_json_text(v))
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "Environment variable '{}' not found in workspace {}",
                    clip(key),
                    ctx.ws
                ))
            }),
    }
}

/// A name of 1 to 64 ASCII letters, digits and the `extra` characters, or a refusal that
/// says what a `what` may hold.
fn checked_name<'a>(text: &'a str, what: &str, extra: &[char]) -> Result<&'a str, Error> {
    let ok = !text.is_empty()
        && text.len() <= 64
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || extra.contains(&c));
    if ok {
        return Ok(text);
    }
    let extra: Vec<String> = extra.iter().map(char::to_string).collect();
    Err(Error::BadRequest(format!(
        "invalid {what} {:?}: use 1 to 64 letters, digits and {} (no spaces)",
        clip(text),
        extra.join(" ")
    )))
}

/// Event types: letters, digits and `_ . : -`.
fn event_type(text: &str) -> Result<&str, Error> {
    checked_name(text, "event type", &['_', '.', ':', '-'])
}

async fn log_event(state: &AppState, ctx: &CallContext, args: &Args) -> Result<Value, Error> {
    need(state, &ctx.user, &ctx.ws, Permission::ReadWrite)?;
    let kind = event_type(args.require_str(0, "event_type")?)?;
    let caps = caps(ctx);
    let data = match args.get(1, "data") {
        None | Some(Value::Nil) => None,
        Some(v) => Some(json_text(v, "an event's data", caps)?),
    };
    let row = EventRow {
        id: 0,
        workspace: ctx.ws.clone(),
        event_type: kind.to_string(),
        user_id: ctx.user.id.to_string(),
        at_ms: now_ms(),
        data,
    };
    if state
        .store
        .log_event(&row, expiry(&ctx.ws), caps.events)
        .await?
        == Write::Full
    {
        return Err(Error::TooManyRequests(format!(
            "workspace {} holds the most events it may ({})",
            ctx.ws, caps.events
        )));
    }
    Ok(Value::Nil)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The filter of `get_events` and `get_event_stats`: the caller's own events.
fn event_filter<'a>(ctx: &'a CallContext, args: &'a Args) -> Result<EventFilter<'a>, Error> {
    let event_type = args.get_str(0, "event_type").map(event_type).transpose()?;
    let time = |index, name| {
        args.get(index, name)
            .filter(|v| !v.is_nil())
            .map(|v| time_ms(v, name))
            .transpose()
    };
    Ok(EventFilter {
        workspace: &ctx.ws,
        user_id: ctx.user.id.as_str(),
        event_type,
        start_ms: time(1, "start_time")?,
        end_ms: time(2, "end_time")?,
    })
}

async fn get_events(state: &AppState, ctx: &CallContext, args: &Args) -> Result<Value, Error> {
    need(state, &ctx.user, &ctx.ws, Permission::Read)?;
    let filter = event_filter(ctx, args)?;
    let rows = state.store.events(&filter, MAX_EVENTS_RETURNED).await?;
    Ok(Value::Array(
        rows.into_iter()
            .map(|row| {
                obj([
                    ("id", row.id.into()),
                    ("event_type", row.event_type.into()),
                    ("workspace", row.workspace.into()),
                    ("user_id", row.user_id.into()),
                    ("timestamp", iso_time(row.at_ms).into()),
                    (
                        "data",
                        row.data.as_deref().map_or(Value::Nil, from_json_text),
                    ),
                ])
            })
            .collect(),
    ))
}

async fn get_event_stats(state: &AppState, ctx: &CallContext, args: &Args) -> Result<Value, Error> {
    need(state, &ctx.user, &ctx.ws, Permission::Read)?;
    let filter = event_filter(ctx, args)?;
    let counts = state.store.event_counts(&filter).await?;
    Ok(Value::Array(
        counts
            .into_iter()
            .map(|(kind, count)| obj([("event_type", kind.into()), ("count", count.into())]))
            .collect(),
    ))
}

/// Service type ids: letters, digits, `_` and `-`.
fn type_name(text: &str) -> Result<&str, Error> {
    checked_name(text, "service type id", &['_', '-'])
}

/// `x` or `ws/x`: the workspace (default `current`) and the type's own id.
fn split_type_id<'a>(id: &'a str, current: &'a str) -> Result<(&'a str, &'a str), Error> {
    let (ws, name) = id.split_once('/').unwrap_or((current, id));
    Ok((ws, type_name(name)?))
}

async fn register_service_type(
    state: &AppState,
    ctx: &CallContext,
    args: &Args,
) -> Result<Value, Error> {
    need(state, &ctx.user, &ctx.ws, Permission::ReadWrite)?;
    let Some(info @ Value::Map(_)) = args.get(0, "type_info") else {
        return Err(Error::BadRequest(
            "register_service_type needs type_info, a dict with id, name and definition".into(),
        ));
    };
    for key in ["id", "name"] {
        if get_str(info, key).is_none() {
            return Err(Error::BadRequest(format!(
                "type_info needs {key} (a string)"
            )));
        }
    }
    if get(info, "definition").is_none_or(Value::is_nil) {
        return Err(Error::BadRequest("type_info needs a definition".into()));
    }
    let given = get_str(info, "id").unwrap_or_default();
    let (ws, name) = split_type_id(given, &ctx.ws)?;
    if ws != ctx.ws {
        return Err(Error::PermissionDenied(format!(
            "a service type is registered in the current workspace ({}), not in {}",
            ctx.ws,
            clip(ws)
        )));
    }
    let mut info = info.clone();
    let full_id = format!("{ws}/{name}");
    value::set(&mut info, "id", full_id.as_str().into());
    let caps = caps(ctx);
    let text = json_text(&info, "a service type", caps)?;
    match state
        .store
        .add_service_type(ws, name, &text, expiry(ws), caps.service_types)
        .await?
    {
        Write::Done => Ok(info),
        Write::Exists => Err(Error::BadRequest(format!(
            "Service type already exists: {full_id}"
        ))),
        Write::Full => Err(Error::TooManyRequests(format!(
            "workspace {ws} holds the most service types it may ({})",
            caps.service_types
        ))),
    }
}

async fn get_service_type(
    state: &AppState,
    ctx: &CallContext,
    args: &Args,
) -> Result<Value, Error> {
    let given = args.require_str(0, "type_id")?;
    let (ws, name) = split_type_id(given, &ctx.ws)?;
    let not_found = || Error::NotFound(format!("Service type not found: {}", clip(given)));
    let types = state.store.service_types(ws).await?;
    let Some(info) = types
        .iter()
        .find(|(id, _)| id == name)
        .map(|(_, text)| from_json_text(text))
    else {
        // The same answer whether it is missing or hidden.
        return match need(state, &ctx.user, ws, Permission::Read) {
            Ok(_) => Err(not_found()),
            Err(e) => Err(e),
        };
    };
    let public = get(&info, "config")
        .and_then(|c| get_str(c, "visibility"))
        .is_some_and(|v| v == "public");
    if !public {
        need(state, &ctx.user, ws, Permission::Read)?;
    }
    Ok(info)
}

async fn list_service_types(
    state: &AppState,
    ctx: &CallContext,
    args: &Args,
) -> Result<Value, Error> {
    let ws = args.get_str(0, "workspace").unwrap_or(&ctx.ws);
    need(state, &ctx.user, ws, Permission::Read)?;
    let types = state.store.service_types(ws).await?;
    Ok(Value::Array(
        types.iter().map(|(_, text)| from_json_text(text)).collect(),
    ))
}

/// Milliseconds since the epoch from seconds (a number) or an ISO 8601 UTC time
/// (`2026-12-03T10:00:00`, with optional fraction and `Z` or `+00:00`).
fn time_ms(value: &Value, name: &str) -> Result<i64, Error> {
    let bad = || {
        Error::BadRequest(format!(
            "{name} must be seconds since the epoch or an ISO 8601 UTC time such as 2026-12-03T10:00:00Z"
        ))
    };
    if let Some(secs) = value.as_f64().or_else(|| value.as_i64().map(|i| i as f64)) {
        return if secs.is_finite() && secs.abs() < 1e12 {
            Ok((secs * 1000.0) as i64)
        } else {
            Err(bad())
        };
    }
    let text = value.as_str().ok_or_else(bad)?;
    parse_iso(text).ok_or_else(bad)
}

fn parse_iso(text: &str) -> Option<i64> {
    let text = text
        .strip_suffix('Z')
        .or_else(|| text.strip_suffix("+00:00"))
        .unwrap_or(text);
    let (date, time) = text.split_once(['T', ' ']).unwrap_or((text, "00:00:00"));
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (clock, fraction) = time.split_once('.').unwrap_or((time, ""));
    let mut t = clock.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (h, min) = (t.next()??, t.next()??);
    let s = t.next().flatten().unwrap_or(0);
    let valid = (1..=12).contains(&m) && (1..=31).contains(&day) && h < 24 && min < 60 && s < 61;
    if !valid || !(1970..=9999).contains(&y) {
        return None;
    }
    let millis = if fraction.is_empty() {
        0
    } else {
        let digits: String = fraction.chars().take(3).collect();
        let padded = format!("{digits:0<3}");
        padded.parse::<i64>().ok()?
    };
    Some(((days_from_civil(y, m, day) * 24 + h) * 60 + min) * 60_000 + s * 1000 + millis)
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `2026-12-03T10:00:00.123Z` from milliseconds since the epoch.
pub(crate) fn iso_time(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let rest = ms.rem_euclid(86_400_000);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3_600_000,
        rest / 60_000 % 60,
        rest / 1000 % 60,
        rest % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_times_round_trip() {
        for ms in [0, 1_764_756_000_123, 951_782_400_000, 4_102_444_799_999] {
            let text = iso_time(ms);
            assert_eq!(parse_iso(&text), Some(ms), "{text}");
        }
        assert_eq!(iso_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso_time(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(
            parse_iso("2026-12-03T10:00:00+00:00"),
            parse_iso("2026-12-03 10:00:00")
        );
        for bad in ["", "2026-13-01", "yesterday", "2026-12-03T25:00:00", "1-1"] {
            assert_eq!(parse_iso(bad), None, "{bad}");
        }
    }

    #[test]
    fn names_are_checked() {
        assert!(event_type("measurement.done").is_ok());
        assert!(event_type("has space").is_err());
        assert!(event_type(&"x".repeat(65)).is_err());
        assert!(type_name("my-type_1").is_ok());
        assert!(type_name("../x").is_err());
        assert_eq!(split_type_id("ws-a/t", "ws-b").unwrap(), ("ws-a", "t"));
        assert_eq!(split_type_id("t", "ws-b").unwrap(), ("ws-b", "t"));
    }
}
