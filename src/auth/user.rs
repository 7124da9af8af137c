//! Users and their per-workspace permissions, in the shape Hypha's `UserInfo` has on the wire,
//! and where an identity came from (the token family it belongs to).

use super::scope::Scope;
use crate::ids::UserId;

/// What a user may do in a workspace. Ordered: a higher permission includes the lower ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Permission {
    Read,
    ReadWrite,
    Admin,
}

impl Permission {
    /// The code used in token scopes (`ws:name#rw`).
    pub(crate) fn code(self) -> &'static str {
        match self {
            Permission::Read => "r",
            Permission::ReadWrite => "rw",
            Permission::Admin => "a",
        }
    }

    /// A scope code: `r`, `rw` or `a`.
    pub(crate) fn from_code(code: &str) -> Option<Self> {
        match code {
            "r" => Some(Permission::Read),
            "rw" => Some(Permission::ReadWrite),
            "a" => Some(Permission::Admin),
            _ => None,
        }
    }

    /// Accepts both the scope codes and the long names used by `generate_token`.
    pub(crate) fn parse(text: &str) -> Option<Self> {
        match text {
            "read" => Some(Permission::Read),
            "read_write" => Some(Permission::ReadWrite),
            "admin" => Some(Permission::Admin),
            code => Self::from_code(code),
        }
    }
}

/// What a token may be used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Signing in: websocket, HTTP, minting children.
    General,
    /// Only coming back on the websocket, as the client it was issued to.
    Reconnection,
}

/// The token an identity was proved with, and the tokens that one was derived from: its
/// family. Revoking any member refuses every token and closes every connection below it.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenRef {
    /// The token's `jti`, or the SHA-256 of a token minted elsewhere without one.
    pub id: String,
    /// Ids of the tokens this one was derived from, oldest first.
    pub lineage: Vec<String>,
    pub expires_at: i64,
    /// When it was issued (`iat`), if it says: grants for a workspace made after that do
    /// not count.
    pub issued_at: Option<i64>,
    pub purpose: Purpose,
}

impl TokenRef {
    /// The token's own id and those of its ancestors.
    pub(crate) fn family(&self) -> impl Iterator<Item = &str> {
        self.lineage
            .iter()
            .map(String::as_str)
            .chain(std::iter::once(self.id.as_str()))
    }
}

/// A signed-in (or anonymous) user, with the scope their token grants.
#[derive(Clone, Debug, PartialEq)]
pub struct UserInfo {
    pub id: UserId,
    pub email: Option<String>,
    /// The account a derived (child) token belongs to.
    pub parent: Option<UserId>,
    pub roles: Vec<String>,
    pub scope: Scope,
    pub expires_at: Option<i64>,
    /// The token that proved this identity; `None` for anonymous users and the server.
    pub token: Option<TokenRef>,
}

/// The id of every anonymous user starts with this (Hypha's spelling).
pub(crate) const ANONYMOUS_ID_PREFIX: &str = "anonymouz-";
/// Temporary workspaces (those of anonymous users) start with this.
pub(crate) const ANONYMOUS_WORKSPACE_PREFIX: &str = "ws-user-anonymouz-";

impl UserInfo {
    /// A fresh anonymous user with its own temporary workspace.
    pub(crate) fn anonymous(expires_in: i64) -> Self {
        Self::new(
            UserId::parse(format!(
                "{ANONYMOUS_ID_PREFIX}{}",
                crate::ids::random_id(12)
            ))
            .unwrap_or_else(|_| unreachable!("a random id is a valid user id")),
            vec!["anonymous".into()],
            Some(super::now_secs() + expires_in),
        )
    }

    /// The user HTTP requests without a token act as: no workspace of its own, read access to `public`.
    pub(crate) fn http_anonymous() -> Self {
        Self::new(
            UserId::parse("http-anonymous").unwrap_or_else(|_| unreachable!()),
            vec!["anonymous".into()],
            None,
        )
    }

    /// The server itself, in the frames it sends.
    pub(crate) fn server() -> Self {
        Self::new(
            UserId::parse("root").unwrap_or_else(|_| unreachable!()),
            vec!["admin".into()],
            None,
        )
    }

    pub fn new(id: UserId, roles: Vec<String>, expires_at: Option<i64>) -> Self {
        Self {
            id,
            email: None,
            parent: None,
            roles,
            scope: Scope::default(),
            expires_at,
            token: None,
        }
    }

    pub fn is_anonymous(&self) -> bool {
        self.roles.iter().any(|r| r == "anonymous")
    }

    pub(crate) fn is_admin(&self) -> bool {
        self.roles.iter().any(|r| r == "admin")
    }

    /// The account at the root of the user's token family: rate limits, disabling and
    /// audits apply to it, whichever child token is used.
    pub fn account(&self) -> &UserId {
        self.parent.as_ref().unwrap_or(&self.id)
    }

    /// Every user owns `ws-user-{id}`.
    pub(crate) fn own_workspace(&self) -> String {
        format!("ws-user-{}", self.id)
    }

    /// Whether `workspace` is [`Self::own_workspace`] (without writing that name out).
    pub(crate) fn is_own_workspace(&self, workspace: &str) -> bool {
        workspace.strip_prefix("ws-user-") == Some(self.id.as_str())
    }

    /// The user's permission in a workspace, if any.
    pub fn permission(&self, workspace: &str) -> Option<Permission> {
        if self.is_admin() || (self.is_own_workspace(workspace) && self.id != "http-anonymous") {
            return Some(Permission::Admin);
        }
        let granted = self.scope.workspaces.get(workspace).copied();
        if workspace == "public" {
            return granted.max(Some(Permission::Read));
        }
        granted
    }

    /// Hypha's `UserInfo.model_dump()`, as clients see it in `context["user"]` and `connection_info`.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        let workspaces: serde_json::Map<String, serde_json::Value> = self
            .scope
            .workspaces
            .iter()
            .map(|(ws, p)| (ws.to_string(), p.code().into()))
            .collect();
        serde_json::json!({
            "id": self.id.as_str(),
            "is_anonymous": self.is_anonymous(),
            "email": self.email,
            "parent": self.parent.as_ref().map(|p| p.as_str()),
            "roles": self.roles,
            "scope": {
                "workspaces": workspaces,
                "client_id": self.scope.client.as_ref().map(|c| c.as_str()),
                "current_workspace": self.scope.current.as_ref().map(|w| w.as_str()),
                "extra_scopes": self.scope.extra.iter().map(|e| e.as_str()).collect::<Vec<_>>(),
            },
            "expires_at": self.expires_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::WorkspaceId;

    #[test]
    fn permissions_follow_hypha_rules() {
        let mut user = UserInfo::new(UserId::parse("alice").unwrap(), vec![], None);
        user.scope
            .workspaces
            .insert(WorkspaceId::parse("lab").unwrap(), Permission::Read);
        assert_eq!(user.permission("ws-user-alice"), Some(Permission::Admin));
        assert_eq!(user.permission("lab"), Some(Permission::Read));
        assert_eq!(user.permission("public"), Some(Permission::Read));
        assert_eq!(user.permission("other"), None);
        let anon = UserInfo::anonymous(600);
        assert!(anon.is_anonymous());
        assert!(anon.own_workspace().starts_with("ws-user-anonymouz-"));
        assert!(user.is_own_workspace("ws-user-alice"));
        for other in [
            "ws-user-alic",
            "ws-user-alice2",
            "ws-user-",
            "alice",
            "ws-usr-alice",
            "",
        ] {
            assert!(!user.is_own_workspace(other), "{other}");
        }
        assert_eq!(
            UserInfo::http_anonymous().permission("ws-user-http-anonymous"),
            None
        );
    }

    #[test]
    fn the_account_is_the_root_of_the_family() {
        let mut child = UserInfo::new(UserId::parse("alice-x1").unwrap(), vec![], None);
        assert_eq!(child.account().as_str(), "alice-x1");
        child.parent = Some(UserId::parse("alice").unwrap());
        assert_eq!(child.account().as_str(), "alice");
    }
}
