//! How a client joins: who it is and which workspace it joins (the websocket's first message, or
//! the query of `GET /rpc`).

use serde::Deserialize;

use crate::auth::workspaces::WorkspaceBook;
use crate::auth::{Permission, Purpose, TokenError, TokenIssuer, UserInfo};
use crate::ids::{ClientId, WorkspaceId};

/// The client's first message, as hypha-rpc sends it.
#[derive(Debug, Deserialize)]
pub(crate) struct Hello {
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub workspace: Option<String>,
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub reconnection_token: Option<String>,
}

/// A client let in.
#[derive(Debug)]
pub(crate) struct Admitted {
    pub user: UserInfo,
    pub workspace: WorkspaceId,
    pub client: ClientId,
    pub permission: Permission,
    /// Proved by a reconnection token: it may replace a live connection under the same address.
    pub reconnecting: bool,
}

/// Why a client is not let in (said to it in the close frame).
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refused {
    #[error("client ids starting with 'manager-' are reserved for the server")]
    ManagerId,
    #[error("the client id '{0}' is reserved for calls made over HTTP")]
    HttpClientId(&'static str),
    #[error(transparent)]
    InvalidId(#[from] crate::ids::InvalidId),
    #[error("the reconnection token carries no client or workspace")]
    ReconnectionIncomplete,
    #[error("the reconnection token is for client {0}, not {1}")]
    ReconnectionClient(ClientId, ClientId),
    #[error("the reconnection token is for workspace {0}")]
    ReconnectionWorkspace(WorkspaceId),
    #[error("the reconnection token has been revoked")]
    ReconnectionRevoked,
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("this token is restricted to {0} and cannot be used for a websocket connection")]
    Specialized(String),
    #[error("the token is bound to client {0}, not {1}")]
    BoundClient(ClientId, ClientId),
    #[error("the token is bound to workspace {0}, not {1}")]
    BoundWorkspace(WorkspaceId, String),
    #[error("Permission denied for workspace {0}: it does not exist or is not accessible")]
    PermissionDenied(WorkspaceId),
}

/// How long an anonymous user's identity lasts (as in Hypha).
const ANONYMOUS_LIFETIME: i64 = 600;

/// Decides whether a client may join, and as whom.
pub(crate) fn admit(
    hello: &Hello,
    tokens: &TokenIssuer,
    book: &WorkspaceBook,
) -> Result<Admitted, Refused> {
    let client_id = match &hello.client_id {
        Some(id) => id.clone(),
        None => crate::ids::random_id(22),
    };
    if crate::hub::is_manager_id(&client_id) {
        return Err(Refused::ManagerId);
    }
    if client_id == crate::http::HTTP_CLIENT {
        return Err(Refused::HttpClientId(crate::http::HTTP_CLIENT));
    }
    let client = ClientId::parse(client_id)?;
    let requested = hello.workspace.as_deref().filter(|w| !w.is_empty());
    let token = hello.token.as_deref().filter(|t| !t.is_empty());

    if let Some(reconnection) = hello
        .reconnection_token
        .as_deref()
        .filter(|t| !t.is_empty())
    {
        match tokens.verify(reconnection) {
            Ok(user) if user.token.as_ref().map(|t| t.purpose) == Some(Purpose::Reconnection) => {
                let (Some(cid), Some(wid)) =
                    (user.scope.client.clone(), user.scope.current.clone())
                else {
                    return Err(Refused::ReconnectionIncomplete);
                };
                if cid != client {
                    return Err(Refused::ReconnectionClient(cid, client));
                }
                if requested.is_some_and(|w| wid != w) {
                    return Err(Refused::ReconnectionWorkspace(wid));
                }
                // The original token, which the clients send along, gives the session back
                // the identity it can mint with; without it the session may only reconnect.
                let user = match token.map(|t| tokens.parse(t)) {
                    Some(Ok(original))
                        if original.id == user.id
                            && book.permission(&original, wid.as_str()).is_some() =>
                    {
                        original
                    }
                    _ => user,
                };
                return finish(user, wid.as_str(), client, true, book);
            }
            Ok(_) => tracing::debug!("a general token was sent as reconnection token"),
            // A revoked family does not get back in under another guise.
            Err(TokenError::Revoked) => {
                return Err(Refused::ReconnectionRevoked);
            }
            // A token from before a restart with another secret, or an expired one: fall back
            // to the original token, which the client always sends along.
            Err(e) => tracing::debug!(error = %e, "reconnection token not usable"),
        }
    }

    let user = match token {
        Some(token) => tokens.parse(token)?,
        None => UserInfo::anonymous(ANONYMOUS_LIFETIME),
    };
    if let Some(scope) = user.scope.extra.iter().find(|s| s.is_specialized()) {
        return Err(Refused::Specialized(scope.to_string()));
    }
    if let Some(cid) = &user.scope.client
        && cid != &client
    {
        return Err(Refused::BoundClient(cid.clone(), client));
    }
    if let (Some(wid), Some(req)) = (&user.scope.current, requested)
        && wid != req
    {
        return Err(Refused::BoundWorkspace(wid.clone(), req.to_string()));
    }
    let workspace = requested
        .map(str::to_string)
        .or_else(|| user.scope.current.as_ref().map(ToString::to_string))
        .unwrap_or_else(|| user.own_workspace());
    finish(user, &workspace, client, false, book)
}

fn finish(
    user: UserInfo,
    workspace: &str,
    client: ClientId,
    reconnecting: bool,
    book: &WorkspaceBook,
) -> Result<Admitted, Refused> {
    let workspace = WorkspaceId::parse(workspace)?;
    let Some(permission) = book.permission(&user, workspace.as_str()) else {
        return Err(Refused::PermissionDenied(workspace));
    };
    Ok(Admitted {
        user,
        workspace,
        client,
        permission,
        reconnecting,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::UserId;
    use secrecy::SecretString;

    /// Admission where no workspace has been made.
    fn admit_plain(hello: &Hello, tokens: &TokenIssuer) -> Result<Admitted, Refused> {
        admit(hello, tokens, &WorkspaceBook::default())
    }

    fn tokens() -> TokenIssuer {
        TokenIssuer::new(&SecretString::from("k".to_string()))
    }

    fn hello(ws: Option<&str>, token: Option<String>, rec: Option<String>) -> Hello {
        Hello {
            client_id: Some("c1".into()),
            workspace: ws.map(Into::into),
            token,
            reconnection_token: rec,
        }
    }

    #[test]
    fn anonymous_gets_own_workspace_only() {
        let a = admit_plain(&hello(None, None, None), &tokens()).unwrap();
        assert!(a.workspace.as_str().starts_with("ws-user-anonymouz-"));
        assert!(admit_plain(&hello(Some("lab"), None, None), &tokens()).is_err());
    }

    #[test]
    fn token_scope_decides_workspace() {
        let t = tokens();
        let mut user = UserInfo::new(UserId::parse("bob").unwrap(), vec![], None);
        user.scope
            .workspaces
            .insert(WorkspaceId::parse("lab").unwrap(), Permission::ReadWrite);
        let token = t.issue(&user, 60);
        assert_eq!(
            admit_plain(&hello(Some("lab"), Some(token.clone()), None), &t)
                .unwrap()
                .permission,
            Permission::ReadWrite
        );
        assert_eq!(
            admit_plain(&hello(None, Some(token.clone()), None), &t)
                .unwrap()
                .workspace
                .as_str(),
            "ws-user-bob"
        );
        assert!(matches!(
            admit_plain(&hello(Some("other"), Some(token), None), &t),
            Err(Refused::PermissionDenied(ws)) if ws.as_str() == "other"
        ));
    }

    #[test]
    fn reconnection_token_must_match_client() {
        let t = tokens();
        let mut user = UserInfo::new(UserId::parse("bob").unwrap(), vec![], None);
        user.scope.client = Some(ClientId::parse("c2").unwrap());
        user.scope.current = Some(WorkspaceId::parse("ws-user-bob").unwrap());
        let (rec, _) = t.issue_reconnection(&user, 60);
        assert!(matches!(
            admit_plain(&hello(None, None, Some(rec)), &t),
            Err(Refused::ReconnectionClient(cid, _)) if cid.as_str() == "c2"
        ));
        user.scope.client = Some(ClientId::parse("c1").unwrap());
        let ok = admit_plain(
            &hello(None, None, Some(t.issue_reconnection(&user, 60).0)),
            &t,
        )
        .unwrap();
        assert!(ok.reconnecting);
        assert_eq!(ok.workspace.as_str(), "ws-user-bob");
    }
}
