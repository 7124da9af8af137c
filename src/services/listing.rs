//! `list_services`, with Hypha's query forms: nothing (the current workspace), a workspace
//! name (`*`: every workspace's public services and the current workspace's), a pattern
//! `ws/client:svc`, `client:svc` or `ws/svc` (`@app` optional), or a dict with `workspace`,
//! `client_id`, `service_id` (alias `id`), `app_id`, `type` and `visibility`. `*` in a part is
//! a wildcard. Unlisted services appear only with `include_unlisted` and read access to
//! their workspace; protected ones only to callers who may use them.

use rmpv::Value;

use crate::AppState;
use crate::error::Error;
use crate::registry::{ServiceEntry, Visibility};
use crate::rpc::peer::CallContext;
use crate::rpc::value::Args;

/// The keys a dict query may hold.
const QUERY_KEYS: &[&str] = &[
    "workspace",
    "client_id",
    "service_id",
    "id",
    "app_id",
    "type",
    "visibility",
];

/// A parsed query. `None` parts match anything.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct ListQuery {
    /// `None`: every workspace (`*`).
    pub workspace: Option<String>,
    pub client: Option<String>,
    pub service: Option<String>,
    pub app: Option<String>,
    pub service_type: Option<String>,
    pub visibility: Option<Visibility>,
}

/// Query parts: letters, digits and `- _ / | *` (and `.` in client ids and types).
fn part(text: &str, what: &str, extra: &[char]) -> Result<Option<String>, Error> {
    let ok = text.len() <= 256
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_/|*".contains(c) || extra.contains(&c));
    if !ok {
        return Err(Error::BadRequest(format!(
            "Invalid characters in query part: {what} {:?}",
            text.chars().take(64).collect::<String>()
        )));
    }
    Ok((!text.is_empty() && text != "*").then(|| text.to_string()))
}

impl ListQuery {
    /// Parses a `list_services` query for a caller in `current`.
    pub(crate) fn parse(query: Option<&Value>, current: &str) -> Result<Self, Error> {
        let mut parsed = ListQuery {
            workspace: Some(current.to_string()),
            ..Default::default()
        };
        match query {
            None | Some(Value::Nil) => {}
            Some(Value::String(text)) => {
                let text = text.as_str().unwrap_or_default();
                let service_with_app = |parsed: &mut ListQuery, s: &str| -> Result<(), Error> {
                    let (service, app) = s.split_once('@').unwrap_or((s, ""));
                    parsed.service = part(service, "service", &[])?;
                    parsed.app = part(app, "app", &[])?;
                    Ok(())
                };
                if let Some((left, right)) = text.split_once(':') {
                    match left.split_once('/') {
                        Some((ws, client)) => {
                            parsed.workspace = workspace_part(ws, current)?;
                            parsed.client = part(client, "client", &['.'])?;
                        }
                        None => parsed.client = part(left, "client", &['.'])?,
                    }
                    service_with_app(&mut parsed, right)?;
                } else if let Some((ws, service)) = text.split_once('/') {
                    parsed.workspace = workspace_part(ws, current)?;
                    service_with_app(&mut parsed, service)?;
                } else {
                    parsed.workspace = workspace_part(text, current)?;
                }
            }
            Some(Value::Map(entries)) => {
                let unknown: Vec<String> = entries
                    .iter()
                    .filter(|(k, _)| !k.as_str().is_some_and(|k| QUERY_KEYS.contains(&k)))
                    .map(|(k, _)| crate::rpc::value::describe_key(k))
                    .collect();
                if !unknown.is_empty() {
                    return Err(Error::BadRequest(format!(
                        "Invalid query keys: {}; a query may hold {}",
                        unknown.join(", "),
                        QUERY_KEYS.join(", ")
                    )));
                }
                let map = query.unwrap_or(&Value::Nil);
                let text = |key: &str| -> Result<Option<&str>, Error> {
                    match crate::rpc::value::get(map, key) {
                        None | Some(Value::Nil) => Ok(None),
                        Some(Value::String(s)) => Ok(s.as_str()),
                        Some(_) => Err(Error::BadRequest(format!(
                            "the query's {key} must be a string"
                        ))),
                    }
                };
                if let Some(ws) = text("workspace")? {
                    parsed.workspace = workspace_part(ws, current)?;
                }
                if let Some(client) = text("client_id")? {
                    parsed.client = part(client, "client_id", &['.'])?;
                }
                if let Some(service) = text("service_id")?.or(text("id")?) {
                    let (service, app) = service.split_once('@').unwrap_or((service, ""));
                    // A full id names its client and workspace too.
                    let service = match service.split_once(':') {
                        Some((left, s)) => {
                            match left.split_once('/') {
                                Some((ws, c)) => {
                                    parsed.workspace = workspace_part(ws, current)?;
                                    parsed.client = part(c, "client_id", &['.'])?;
                                }
                                None => parsed.client = part(left, "client_id", &['.'])?,
                            }
                            s
                        }
                        None => service,
                    };
                    parsed.service = part(service, "service_id", &[])?;
                    parsed.app = part(app, "app_id", &[])?;
                }
                if let Some(app) = text("app_id")? {
                    parsed.app = part(app, "app_id", &[])?;
                }
                if let Some(kind) = text("type")? {
                    parsed.service_type = part(kind, "type", &['.'])?;
                }
                if let Some(v) = text("visibility")? {
                    parsed.visibility = Some(Visibility::parse(Some(v))?);
                }
            }
            Some(_) => {
                return Err(Error::BadRequest(
                    "query must be a workspace name, a service pattern such as ws/client:svc, or a dict".into(),
                ));
            }
        }
        Ok(parsed)
    }

    /// Whether an entry answers the query (workspace aside).
    pub(crate) fn matches(&self, entry: &ServiceEntry) -> bool {
        let matches =
            |pattern: &Option<String>, text: &str| pattern.as_deref().is_none_or(|p| glob(p, text));
        matches(&self.client, entry.id.provider.client.as_str())
            && matches(&self.service, entry.id.name.as_str())
            && matches(&self.app, entry.id.app.as_deref().unwrap_or(""))
            && matches(&self.service_type, &entry.service_type)
            && self.visibility.is_none_or(|v| v == entry.visibility)
    }
}

fn workspace_part(text: &str, current: &str) -> Result<Option<String>, Error> {
    match text {
        "*" => Ok(None),
        "" => Ok(Some(current.to_string())),
        _ => Ok(Some(part(text, "workspace", &[])?.unwrap_or_default())),
    }
}

/// `*` matches any run of characters; everything else matches itself.
pub(crate) fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Runs `list_services(query=None, include_unlisted=False, ...)`.
pub(crate) async fn list_services(
    state: &AppState,
    ctx: &CallContext,
    args: &Args,
) -> Result<Value, Error> {
    let mut query = ListQuery::parse(args.get(0, "query"), &ctx.ws)?;
    if let Some(t) = args.kwarg("type").and_then(Value::as_str) {
        query.service_type = part(t, "type", &['.'])?;
    }
    let include_unlisted = args
        .get(1, "include_unlisted")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let readable = |ws: &str| ws == ctx.ws || state.workspaces.permission(&ctx.user, ws).is_some();
    let candidates = match &query.workspace {
        Some(ws) => crate::workspace::services_in(state, ws).await?,
        None => {
            // Every workspace's public services this instance knows (its own clients' and
            // the shared `public` workspace's), and the current workspace's.
            let mut all = crate::workspace::services_in(state, &ctx.ws).await?;
            all.extend(crate::workspace::services_in(state, "public").await?);
            all.extend(
                state
                    .registry
                    .all()
                    .into_iter()
                    .filter(|e| e.visibility == Visibility::Public),
            );
            let mut seen = std::collections::HashSet::new();
            all.retain(|e| seen.insert(e.key()));
            all
        }
    };
    let listed = candidates
        .into_iter()
        .filter(|e| query.matches(e))
        .filter(|e| {
            let home = e.id.provider.workspace.as_str();
            match e.visibility {
                Visibility::Public => true,
                Visibility::Protected => {
                    (query.workspace.is_some() || home == ctx.ws)
                        && e.allows(&ctx.ws, &ctx.user, &state.workspaces)
                }
                Visibility::Unlisted => include_unlisted && readable(home),
            }
        })
        .map(ServiceEntry::into_info)
        .collect();
    Ok(Value::Array(listed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(text: &str) -> ListQuery {
        ListQuery::parse(Some(&Value::from(text)), "ws-a").unwrap()
    }

    #[test]
    fn globs_match_as_shell_stars_do() {
        assert!(glob("*", ""));
        assert!(glob("a*c", "abbbc"));
        assert!(glob("*-svc", "my-svc"));
        assert!(!glob("a*c", "abd"));
        assert!(glob("a**", "a"));
        assert!(!glob("abc", "ab"));
    }

    #[test]
    fn string_queries_take_hypha_forms() {
        assert_eq!(q("").workspace.as_deref(), Some("ws-a"));
        assert_eq!(q("lab").workspace.as_deref(), Some("lab"));
        assert_eq!(q("*").workspace, None);
        let full = q("lab/client-1:svc@app");
        assert_eq!(full.workspace.as_deref(), Some("lab"));
        assert_eq!(full.client.as_deref(), Some("client-1"));
        assert_eq!(full.service.as_deref(), Some("svc"));
        assert_eq!(full.app.as_deref(), Some("app"));
        let short = q("c:s*");
        assert_eq!(short.workspace.as_deref(), Some("ws-a"));
        assert_eq!(short.service.as_deref(), Some("s*"));
        assert_eq!(q("lab/svc").service.as_deref(), Some("svc"));
        assert!(ListQuery::parse(Some(&Value::from("lab/<x>")), "ws-a").is_err());
    }

    #[test]
    fn dict_queries_refuse_unknown_keys() {
        let map = Value::Map(vec![
            ("service_id".into(), "default".into()),
            ("visibility".into(), "public".into()),
        ]);
        let parsed = ListQuery::parse(Some(&map), "ws-a").unwrap();
        assert_eq!(parsed.service.as_deref(), Some("default"));
        assert_eq!(parsed.visibility, Some(Visibility::Public));
        let bad = Value::Map(vec![("colour".into(), "red".into())]);
        let e = ListQuery::parse(Some(&bad), "ws-a").unwrap_err();
        assert!(e.to_string().contains("Invalid query keys"), "{e}");
        let bad = Value::Map(vec![("visibility".into(), "secret".into())]);
        assert!(ListQuery::parse(Some(&bad), "ws-a").is_err());
    }
}
