//! Users and their per-workspace permissions, in the shape Hypha's `UserInfo` has on the wire.

use std::collections::BTreeMap;

use rmpv::Value;

/// What a user may do in a workspace. Ordered: a higher permission includes the lower ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Permission {
    Read,
    ReadWrite,
    Admin,
}

impl Permission {
    /// The code used in token scopes (`ws:name#rw`).
    pub fn code(self) -> &'static str {
        match self {
            Permission::Read => "r",
            Permission::ReadWrite => "rw",
            Permission::Admin => "a",
        }
    }

    /// Accepts both the scope codes and the long names used by `generate_token`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "r" | "read" => Some(Permission::Read),
            "rw" | "read_write" => Some(Permission::ReadWrite),
            "a" | "admin" => Some(Permission::Admin),
            _ => None,
        }
    }
}

/// A signed-in (or anonymous) user, with the scope their token grants.
#[derive(Clone, Debug, PartialEq)]
pub struct UserInfo {
    pub id: String,
    pub email: Option<String>,
    pub parent: Option<String>,
    pub roles: Vec<String>,
    /// Explicit grants from the token's `ws:` scopes.
    pub workspaces: BTreeMap<String, Permission>,
    /// The `cid:` scope: the only client id this token may connect as.
    pub client_id: Option<String>,
    /// The `wid:` scope: the workspace this token is bound to.
    pub current_workspace: Option<String>,
    pub extra_scopes: Vec<String>,
    pub expires_at: Option<i64>,
}

impl UserInfo {
    /// A fresh anonymous user with its own temporary workspace.
    pub fn anonymous(expires_in: i64) -> Self {
        Self::new(
            format!("anonymouz-{}", super::random_id(12)),
            vec!["anonymous".into()],
            Some(super::now_secs() + expires_in),
        )
    }

    /// The user HTTP requests without a token act as: no workspace of its own, read access to `public`.
    pub fn http_anonymous() -> Self {
        Self::new("http-anonymous".into(), vec!["anonymous".into()], None)
    }

    pub fn new(id: String, roles: Vec<String>, expires_at: Option<i64>) -> Self {
        Self {
            id,
            email: None,
            parent: None,
            roles,
            workspaces: BTreeMap::new(),
            client_id: None,
            current_workspace: None,
            extra_scopes: Vec::new(),
            expires_at,
        }
    }

    pub fn is_anonymous(&self) -> bool {
        self.roles.iter().any(|r| r == "anonymous")
    }

    pub fn is_admin(&self) -> bool {
        self.roles.iter().any(|r| r == "admin")
    }

    /// Every user owns `ws-user-{id}`.
    pub fn own_workspace(&self) -> String {
        format!("ws-user-{}", self.id)
    }

    /// The user's permission in a workspace, if any.
    pub fn permission(&self, workspace: &str) -> Option<Permission> {
        if self.is_admin() || (workspace == self.own_workspace() && self.id != "http-anonymous") {
            return Some(Permission::Admin);
        }
        let granted = self.workspaces.get(workspace).copied();
        if workspace == "public" {
            return granted.max(Some(Permission::Read));
        }
        granted
    }

    /// Hypha's `UserInfo.model_dump()`, as clients see it in `context["user"]` and `connection_info`.
    pub fn to_json(&self) -> serde_json::Value {
        let workspaces: serde_json::Map<String, serde_json::Value> = self
            .workspaces
            .iter()
            .map(|(ws, p)| (ws.clone(), p.code().into()))
            .collect();
        serde_json::json!({
            "id": self.id,
            "is_anonymous": self.is_anonymous(),
            "email": self.email,
            "parent": self.parent,
            "roles": self.roles,
            "scope": {
                "workspaces": workspaces,
                "client_id": self.client_id,
                "current_workspace": self.current_workspace,
                "extra_scopes": self.extra_scopes,
            },
            "expires_at": self.expires_at,
        })
    }

    /// The same dict as a msgpack value, for the `user` field of routed frames.
    pub fn to_value(&self) -> Value {
        crate::rpc::value::from_json(&self.to_json())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_follow_hypha_rules() {
        let mut user = UserInfo::new("alice".into(), vec![], None);
        user.workspaces.insert("lab".into(), Permission::Read);
        assert_eq!(user.permission("ws-user-alice"), Some(Permission::Admin));
        assert_eq!(user.permission("lab"), Some(Permission::Read));
        assert_eq!(user.permission("public"), Some(Permission::Read));
        assert_eq!(user.permission("other"), None);
        let anon = UserInfo::anonymous(600);
        assert!(anon.is_anonymous());
        assert!(anon.own_workspace().starts_with("ws-user-anonymouz-"));
        assert_eq!(
            UserInfo::http_anonymous().permission("ws-user-http-anonymous"),
            None
        );
    }
}
