//! Workspaces with Hypha's manager functions: `create_workspace`, `list_workspaces`,
//! `delete_workspace` and `get_workspace_info`. A made workspace is kept in the store, shared
//! by every instance; its owners administer it. Deleting one closes its connections and
//! clears its data, and the grants that tokens carried for it never count again, not even
//! for a new workspace of the same name.

use std::sync::Arc;
use std::time::Duration;

use rmpv::Value;
use serde_json::json;

use super::manager::need;
use crate::AppState;
use crate::auth::workspaces::{Description, Workspace};
use crate::auth::{Permission, Purpose, UserInfo};
use crate::error::Error;
use crate::ids::WorkspaceId;
use crate::rpc::describe::Function;
use crate::rpc::peer::CallContext;
use crate::rpc::value::{self, Args};
use crate::store::workspace_data::Write;
use crate::store::workspaces::WorkspaceRow;

/// Live workspaces one account may make (Hypha's default quota).
const MAX_PER_ACCOUNT: i64 = 100;
/// Workspaces one account may have made and not yet forgotten, deleted ones included: making
/// and deleting in a loop cannot grow the store and every instance's book without end.
const MAX_KEPT_PER_ACCOUNT: i64 = 1_000;
/// Owners one workspace may list.
const MAX_OWNERS: usize = 16;
/// Largest description of a workspace, as JSON text.
const MAX_DESCRIPTION: usize = 32 * 1024;
/// Most workspaces one `list_workspaces` call returns (Hypha's limit).
const MAX_LISTED: i64 = 256;
/// Keys of Hypha's `WorkspaceInfo` that a configuration may carry.
const KEYS: &[&str] = &[
    "id",
    "name",
    "description",
    "persistent",
    "owners",
    "read_only",
    "icon",
    "covers",
    "docs",
    "config",
    "type",
    "status",
    "service_types",
];

/// The functions of this module, for the manager's table.
pub(crate) fn functions() -> Vec<Function> {
    vec![
        Function::new(
            "get_workspace_info",
            "Describe a workspace.",
            json!({"workspace":{"type":"string","description":"Workspace name; default the caller's"}}),
            &[],
        ),
        Function::new(
            "create_workspace",
            "Create a workspace that you own: id (lowercase letters, digits and hyphens, with at least one hyphen), name, description, owners, persistent, read_only.",
            json!({"config":{"type":"object","description":"id, name, description, owners, persistent, read_only, icon, covers, docs, config"},"overwrite":{"type":"boolean","description":"Replace the description of an existing workspace you administer"}}),
            &["config"],
        ),
        Function::new(
            "list_workspaces",
            "List the workspaces you own or may use.",
            json!({"match":{"type":"object","description":"Fields the workspaces must have: id, name, description, persistent, read_only, owners"},"offset":{"type":"integer"},"limit":{"type":"integer","description":"1 to 256"}}),
            &[],
        ),
        Function::new(
            "delete_workspace",
            "Delete a workspace you administer: its connections are closed and its data is removed.",
            json!({"workspace":{"type":"string"}}),
            &["workspace"],
        ),
    ]
}

/// Runs one of this module's functions; `None` when `function` is not one of them.
pub(crate) async fn call(
    state: &Arc<AppState>,
    ctx: &CallContext,
    function: &str,
    args: &Args,
) -> Option<Result<Value, Error>> {
    Some(match function {
        "get_workspace_info" => workspace_info(state, ctx, args),
        "create_workspace" => create(state, ctx, args).await,
        "list_workspaces" => list(state, ctx, args),
        "delete_workspace" => delete(state, ctx, args).await,
        _ => return None,
    })
}

/// The description of a workspace nobody made: a user's own, or one that tokens name.
fn unmade_info(
    user: &UserInfo,
    workspace: &str,
    permission: Option<Permission>,
) -> serde_json::Value {
    let owners: Vec<&str> = if user.is_own_workspace(workspace) {
        vec![user.id.as_str()]
    } else {
        vec![]
    };
    json!({
        "type": "workspace",
        "id": workspace,
        "name": workspace,
        "description": "",
        "persistent": false,
        "read_only": permission == Some(Permission::Read),
        "owners": owners,
    })
}

fn workspace_info(state: &AppState, ctx: &CallContext, args: &Args) -> Result<Value, Error> {
    let ws = args.get_str(0, "workspace").unwrap_or(&ctx.ws);
    let permission = need(state, &ctx.user, ws, Permission::Read)?;
    Ok(value::from_json(&match state.workspaces.get(ws) {
        Some(made) if made.exists() => made.to_json(),
        _ => unmade_info(&ctx.user, ws, Some(permission)),
    }))
}

/// Refuses callers who may not make workspaces: anonymous users, derived tokens and
/// sessions resumed with a reconnection token alone.
fn may_create(user: &UserInfo) -> Result<(), Error> {
    if user.is_anonymous() {
        return Err(Error::PermissionDenied(
            "Only registered user can create workspace.".into(),
        ));
    }
    match &user.token {
        Some(token) if token.purpose != Purpose::General => Err(Error::PermissionDenied(
            "this connection was resumed with a reconnection token, which cannot create workspaces; reconnect with your token".into(),
        )),
        None => Err(Error::PermissionDenied(
            "this connection was opened without a token, so it cannot create workspaces".into(),
        )),
        Some(_) if user.parent.is_some() => Err(Error::PermissionDenied(
            "workspaces are created with an account's own token, not with a token derived from it".into(),
        )),
        Some(_) => Ok(()),
    }
}

/// A workspace id a caller may take: Hypha's rule (lowercase letters, digits, `-` and `|`,
/// with a hyphen unless an admin makes it), and never `public`, a temporary workspace or
/// another user's own workspace.
fn workspace_id(user: &UserInfo, id: &str) -> Result<WorkspaceId, Error> {
    let bad = |why: String| Err(Error::BadRequest(why));
    if id.is_empty() {
        return bad("Workspace name must not be empty.".into());
    }
    if !user.is_admin() && !id.contains('-') {
        return bad("Workspace name must contain at least one hyphen (e.g. my-workspace).".into());
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '|')
    {
        return bad(format!(
            "Invalid workspace name: {}, only lowercase letters, numbers and hyphens are allowed.",
            id.chars().take(64).collect::<String>()
        ));
    }
    let parsed = WorkspaceId::parse(id).map_err(|e| Error::BadRequest(e.to_string()))?;
    if id == "public" || id.starts_with(crate::auth::user::ANONYMOUS_WORKSPACE_PREFIX) {
        return Err(Error::PermissionDenied(format!(
            "the workspace name {id} is reserved"
        )));
    }
    if id.starts_with("ws-user-") && !user.is_own_workspace(id) {
        return Err(Error::PermissionDenied(format!(
            "{id} is another user's own workspace; yours is {}",
            user.own_workspace()
        )));
    }
    Ok(parsed)
}

fn text_field(
    config: &serde_json::Map<String, serde_json::Value>,
    key: &str,
    max: usize,
) -> Result<Option<String>, Error> {
    match config.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) if s.chars().count() <= max => Ok(Some(s.clone())),
        Some(_) => Err(Error::BadRequest(format!(
            "{key} must be a string of at most {max} characters"
        ))),
    }
}

fn flag(config: &serde_json::Map<String, serde_json::Value>, key: &str) -> Result<bool, Error> {
    match config.get(key) {
        None | Some(serde_json::Value::Null) => Ok(false),
        Some(serde_json::Value::Bool(b)) => Ok(*b),
        Some(_) => Err(Error::BadRequest(format!("{key} must be true or false"))),
    }
}

fn strings(
    config: &serde_json::Map<String, serde_json::Value>,
    key: &str,
    max_items: usize,
) -> Result<Vec<String>, Error> {
    let wrong = || {
        Error::BadRequest(format!(
            "{key} must be a list of at most {max_items} strings of 1 to 254 characters"
        ))
    };
    match config.get(key) {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(serde_json::Value::Array(items)) if items.len() <= max_items => items
            .iter()
            .map(|item| match item.as_str().map(str::trim) {
                Some(s) if !s.is_empty() && s.len() <= 254 && !s.chars().any(char::is_control) => {
                    Ok(s.to_string())
                }
                _ => Err(wrong()),
            })
            .collect(),
        Some(_) => Err(wrong()),
    }
}

/// Reads a `create_workspace` configuration into its id and description; the caller is
/// made an owner.
fn parse_config(user: &UserInfo, config: &Value) -> Result<(WorkspaceId, Description), Error> {
    let serde_json::Value::Object(config) = value::to_json(config) else {
        return Err(Error::BadRequest(
            "create_workspace needs the configuration as a dict with an id".into(),
        ));
    };
    if let Some(key) = config.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(Error::BadRequest(format!(
            "unknown workspace field {:?}; the fields are {}",
            key.chars().take(64).collect::<String>(),
            KEYS.join(", ")
        )));
    }
    if config
        .get("type")
        .is_some_and(|t| !t.is_null() && t.as_str() != Some("workspace"))
    {
        return Err(Error::BadRequest("type must be \"workspace\"".into()));
    }
    if config
        .get("service_types")
        .is_some_and(|t| !t.is_null() && t.as_object().is_none_or(|m| !m.is_empty()))
    {
        return Err(Error::BadRequest(
            "service types are registered with register_service_type once the workspace exists"
                .into(),
        ));
    }
    let id = match config.get("id").or_else(|| config.get("name")) {
        Some(serde_json::Value::String(id)) => workspace_id(user, id)?,
        _ => {
            return Err(Error::BadRequest("Workspace id must be provided.".into()));
        }
    };
    let mut owners = strings(&config, "owners", MAX_OWNERS)?;
    let owned = owners
        .iter()
        .any(|o| o == user.id.as_str() || Some(o.as_str()) == user.email.as_deref());
    if !owned {
        if owners.len() >= MAX_OWNERS {
            return Err(Error::BadRequest(format!(
                "a workspace has at most {MAX_OWNERS} owners, you included"
            )));
        }
        owners.push(user.id.to_string());
    }
    owners.dedup();
    let extra = match config.get("config") {
        None | Some(serde_json::Value::Null) => serde_json::Map::new(),
        Some(serde_json::Value::Object(m)) => m.clone(),
        Some(_) => return Err(Error::BadRequest("config must be a dict".into())),
    };
    let described = Description {
        name: text_field(&config, "name", 128)?
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| id.to_string()),
        description: text_field(&config, "description", 4096)?,
        owners,
        persistent: flag(&config, "persistent")?,
        read_only: flag(&config, "read_only")?,
        icon: text_field(&config, "icon", 2048)?,
        covers: strings(&config, "covers", 8)?,
        docs: text_field(&config, "docs", 8192)?,
        config: extra,
    };
    Ok((id, described))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

async fn create(state: &AppState, ctx: &CallContext, args: &Args) -> Result<Value, Error> {
    may_create(&ctx.user)?;
    let config = args
        .get(0, "config")
        .ok_or_else(|| Error::BadRequest("Workspace id must be provided.".into()))?;
    let overwrite = match args.get(1, "overwrite") {
        None | Some(Value::Nil) => false,
        Some(Value::Boolean(b)) => *b,
        Some(_) => return Err(Error::BadRequest("overwrite must be true or false".into())),
    };
    let (id, described) = parse_config(&ctx.user, config)?;
    let info = serde_json::to_string(&described)
        .map_err(|e| Error::Internal(format!("a workspace description: {e}")))?;
    if info.len() > MAX_DESCRIPTION {
        return Err(Error::BadRequest(format!(
            "the workspace's description takes {} bytes; at most {MAX_DESCRIPTION} are kept",
            info.len()
        )));
    }
    let existing = state.workspaces.get(id.as_str()).filter(Workspace::exists);
    let workspace = match existing {
        Some(made) if overwrite => {
            if state.workspaces.permission(&ctx.user, id.as_str()) != Some(Permission::Admin) {
                return Err(Error::PermissionDenied(format!(
                    "Permission denied: user {} cannot overwrite workspace {id}",
                    ctx.user.id
                )));
            }
            if !state
                .store
                .update_workspace(id.as_str(), &info, now_ms())
                .await?
            {
                return Err(Error::NotFound(format!("Workspace {id} not found")));
            }
            Workspace { described, ..made }
        }
        Some(_) => {
            return Err(Error::BadRequest(format!("Workspace already exists: {id}")));
        }
        None => {
            // A workspace that tokens name and that has clients now is in use: taking its
            // name would void their grants under them.
            if !ctx.user.is_own_workspace(id.as_str())
                && !crate::workspace::clients_in(state, id.as_str())
                    .await?
                    .is_empty()
            {
                return Err(Error::BadRequest(format!(
                    "Workspace already exists: {id} (clients are connected to it)"
                )));
            }
            let now = now_ms();
            let created_at = state
                .workspaces
                .get(id.as_str())
                .map_or(now, |gone| gone.remade_at(now));
            let row = WorkspaceRow {
                id: id.to_string(),
                info,
                created_by: ctx.user.id.to_string(),
                created_at,
                changed_at: now,
                deleted_at: None,
            };
            if !ctx.user.is_admin() {
                let (live, kept) = state.store.workspaces_made_by(&row.created_by).await?;
                if live >= MAX_PER_ACCOUNT {
                    return Err(Error::TooManyRequests(format!(
                        "Workspace quota exceeded: user {} already owns {MAX_PER_ACCOUNT} workspaces (max {MAX_PER_ACCOUNT}). Delete unused workspaces before creating new ones.",
                        ctx.user.id
                    )));
                }
                // Taking back a deleted name reuses its row; a new name adds one.
                let new_row = state.workspaces.get(id.as_str()).is_none();
                if new_row && kept >= MAX_KEPT_PER_ACCOUNT {
                    return Err(Error::TooManyRequests(format!(
                        "Workspace quota exceeded: user {} has made {MAX_KEPT_PER_ACCOUNT} workspaces in the last year (deleted ones are remembered a year, so the tokens issued for them stay void)",
                        ctx.user.id
                    )));
                }
            }
            if state.store.create_workspace(&row).await? == Write::Exists {
                return Err(Error::BadRequest(format!("Workspace already exists: {id}")));
            }
            Workspace {
                id: row.id,
                described,
                created_by: row.created_by,
                created_at: row.created_at,
                deleted_at: None,
            }
        }
    };
    let info = workspace.to_json();
    state.workspaces.put(workspace);
    tracing::info!(workspace = %id, by = %ctx.user.id, "workspace created");
    let event = value::from_json(&info);
    crate::workspace::emit(state, &ctx.ws, "workspace_loaded", event.clone()).await;
    Ok(event)
}

fn list(state: &AppState, ctx: &CallContext, args: &Args) -> Result<Value, Error> {
    let offset = integer(args.get(1, "offset"), "offset", 0)?;
    let limit = integer(args.get(2, "limit"), "limit", MAX_LISTED)?;
    if offset < 0 {
        return Err(Error::BadRequest(
            "Offset number must be greater than or equal to 0".into(),
        ));
    }
    if !(1..=MAX_LISTED).contains(&limit) {
        return Err(Error::BadRequest(
            "Limit must be greater than 0 and less than 256".into(),
        ));
    }
    let wanted = match args.get(0, "match").map(value::to_json) {
        None | Some(serde_json::Value::Null) => serde_json::Map::new(),
        Some(serde_json::Value::Object(m)) => m,
        Some(_) => return Err(Error::BadRequest("match must be a dict".into())),
    };
    const MATCHABLE: &[&str] = &[
        "id",
        "name",
        "description",
        "persistent",
        "read_only",
        "owners",
    ];
    if let Some(key) = wanted.keys().find(|k| !MATCHABLE.contains(&k.as_str())) {
        return Err(Error::BadRequest(format!(
            "workspaces cannot be matched on {:?}; use {}",
            key.chars().take(64).collect::<String>(),
            MATCHABLE.join(", ")
        )));
    }
    let user = &ctx.user;
    let mut found = Vec::new();
    let own = user.own_workspace();
    let own_made = state.workspaces.get(&own).is_some_and(|w| w.exists());
    if !own_made && user.id != "http-anonymous" {
        found.push(unmade_info(user, &own, Some(Permission::Admin)));
    }
    found.extend(
        state
            .workspaces
            .existing()
            .into_iter()
            .filter(|w| state.workspaces.permission(user, &w.id).is_some())
            .map(|w| w.to_json()),
    );
    let listed: Vec<Value> = found
        .into_iter()
        .filter(|info| wanted.iter().all(|(k, v)| info.get(k) == Some(v)))
        .skip(offset as usize)
        .take(limit as usize)
        .map(|info| {
            let pick = |k: &str| info.get(k).cloned().unwrap_or(serde_json::Value::Null);
            value::from_json(&json!({
                "id": pick("id"),
                "name": pick("name"),
                "description": pick("description"),
                "read_only": pick("read_only"),
                "persistent": pick("persistent"),
                "owners": pick("owners"),
            }))
        })
        .collect();
    Ok(Value::Array(listed))
}

fn integer(value: Option<&Value>, name: &str, default: i64) -> Result<i64, Error> {
    match value {
        None | Some(Value::Nil) => Ok(default),
        Some(v) => v
            .as_i64()
            .ok_or_else(|| Error::BadRequest(format!("{name} must be an integer"))),
    }
}

/// How long the caller's own connection keeps going after it deleted its workspace, so the
/// answer reaches it first.
const OWN_CLOSE_DELAY: Duration = Duration::from_millis(500);

async fn delete(state: &Arc<AppState>, ctx: &CallContext, args: &Args) -> Result<Value, Error> {
    let id = args.require_str(0, "workspace")?;
    let Some(made) = state.workspaces.get(id).filter(Workspace::exists) else {
        return Err(Error::NotFound(format!(
            "Workspace {} not found (only workspaces made with create_workspace are deleted)",
            id.chars().take(64).collect::<String>()
        )));
    };
    if state.workspaces.permission(&ctx.user, id) != Some(Permission::Admin) {
        return Err(Error::PermissionDenied(format!(
            "Permission denied for workspace {id}"
        )));
    }
    let now = now_ms();
    if !state.store.delete_workspace(id, now, now).await? {
        return Err(Error::NotFound(format!("Workspace {id} not found")));
    }
    let info = value::from_json(&made.to_json());
    state.workspaces.put(Workspace {
        deleted_at: Some(now),
        ..made
    });
    close_connections(state, id, Some(&ctx.from));
    tracing::info!(workspace = %id, by = %ctx.user.id, "workspace deleted");
    crate::workspace::emit(state, &ctx.ws, "workspace_deleted", info).await;
    Ok(Value::Nil)
}

/// Closes the connections of a deleted workspace here; the caller's own (`caller`, an
/// address) a moment later, so the answer to its call reaches it first.
pub(crate) fn close_connections(state: &Arc<AppState>, workspace: &str, caller: Option<&str>) {
    const REASON: &str = "the workspace has been deleted";
    let own = caller
        .and_then(|addr| addr.split_once('/'))
        .filter(|(ws, _)| *ws == workspace)
        .map(|(_, client)| client.to_string());
    let closed = state.hub.close_workspace(workspace, own.as_deref(), REASON);
    if closed > 0 {
        tracing::info!(%workspace, connections = closed, "closed the connections of a deleted workspace");
    }
    if let Some(client) = own {
        let state = state.clone();
        let addr = format!("{workspace}/{client}");
        tokio::spawn(async move {
            tokio::time::sleep(OWN_CLOSE_DELAY).await;
            if let Some(handle) = state.hub.get(&addr) {
                handle.close(REASON);
            }
        });
    }
}
