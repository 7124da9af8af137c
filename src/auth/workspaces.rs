//! Workspaces made with `create_workspace`, as every instance knows them: who owns each (its
//! owners administer it) and since when the grants that tokens carry for it count. Read from
//! the store at start-up and every couple of seconds after, so the instances agree within
//! seconds; the instance that makes a change applies it at once.

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicI64, Ordering};

use serde::{Deserialize, Serialize};

use super::{Permission, UserInfo};
use crate::store::workspaces::WorkspaceRow;

/// What a workspace's owner said about it (stored as JSON); checked before it is stored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Description {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// User ids or emails; each owner administers the workspace.
    #[serde(default)]
    pub owners: Vec<String>,
    #[serde(default)]
    pub persistent: bool,
    /// Only owners (and admins) may write in it; everyone else reads.
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub icon: Option<String>,
    #[serde(default)]
    pub covers: Vec<String>,
    #[serde(default)]
    pub docs: Option<String>,
    #[serde(default)]
    pub config: serde_json::Map<String, serde_json::Value>,
}

/// A workspace as the book holds it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Workspace {
    pub id: String,
    pub described: Description,
    pub created_by: String,
    /// Milliseconds since the epoch.
    pub created_at: i64,
    /// Milliseconds since the epoch; a deleted workspace stays in the book so that the
    /// grants tokens carried for it stay void.
    pub deleted_at: Option<i64>,
}

/// How far the clocks of the instances (and the whole seconds of a token's `iat`) may put a
/// token's issue before the moment it was really issued.
pub(crate) const CLOCK_SLACK_MS: i64 = 2_000;

impl Workspace {
    /// Reads a stored row; `None` if its description is unreadable (it is then ignored).
    pub(crate) fn from_row(row: &WorkspaceRow) -> Option<Self> {
        let described = match serde_json::from_str(&row.info) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(workspace = %row.id, error = %e, "a stored workspace cannot be read; it is ignored");
                return None;
            }
        };
        Some(Self {
            id: row.id.clone(),
            described,
            created_by: row.created_by.clone(),
            created_at: row.created_at,
            deleted_at: row.deleted_at,
        })
    }

    pub(crate) fn exists(&self) -> bool {
        self.deleted_at.is_none()
    }

    /// Whether `user` is one of its owners: only an account's own token (not a derived one,
    /// never an anonymous user) owns, by its id or its email.
    pub(crate) fn owned_by(&self, user: &UserInfo) -> bool {
        self.exists()
            && !user.is_anonymous()
            && user.parent.is_none()
            && self.described.owners.iter().any(|owner| {
                owner == user.id.as_str() || user.email.as_deref() == Some(owner.as_str())
            })
    }

    /// Whether a grant in a token issued at `issued_at` (seconds) is for this workspace: one
    /// issued since it was made, not before; once it is deleted, only one issued clearly
    /// after the deletion (by an admin, for a workspace of that name nobody made).
    fn counts_grant_issued(&self, issued_at: i64) -> bool {
        let issued_ms = issued_at.saturating_mul(1000);
        match self.deleted_at {
            Some(deleted) => issued_ms > deleted + CLOCK_SLACK_MS,
            None => issued_ms >= self.created_at - CLOCK_SLACK_MS,
        }
    }

    /// When a workspace made now under this (deleted) one's name is said to be made: late
    /// enough that no grant issued before the deletion counts for it.
    pub(crate) fn remade_at(&self, now_ms: i64) -> i64 {
        match self.deleted_at {
            Some(deleted) => now_ms.max(deleted + CLOCK_SLACK_MS + 1),
            None => now_ms,
        }
    }

    /// Hypha's `WorkspaceInfo`, as `get_workspace_info` and `list_workspaces` answer.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        let d = &self.described;
        serde_json::json!({
            "type": "workspace",
            "id": self.id,
            "name": d.name,
            "description": d.description,
            "persistent": d.persistent,
            "owners": d.owners,
            "read_only": d.read_only,
            "icon": d.icon,
            "covers": d.covers,
            "docs": d.docs,
            "config": d.config,
            "status": {"ready": true, "status": "ready"},
        })
    }
}

/// Every workspace made with `create_workspace`, deleted ones included, by id.
#[derive(Default)]
pub(crate) struct WorkspaceBook {
    workspaces: RwLock<HashMap<String, Workspace>>,
    /// The newest change read from the store (milliseconds).
    read_up_to: AtomicI64,
}

/// How far back each reload reads again, for instances whose clocks lag a little.
const RELOAD_OVERLAP_MS: i64 = 10_000;

impl WorkspaceBook {
    /// The workspace with this id, deleted or not.
    pub(crate) fn get(&self, id: &str) -> Option<Workspace> {
        self.workspaces.read().ok()?.get(id).cloned()
    }

    /// The workspaces that exist, by id.
    pub(crate) fn existing(&self) -> Vec<Workspace> {
        let mut found: Vec<Workspace> = self
            .workspaces
            .read()
            .map(|w| w.values().filter(|w| w.exists()).cloned().collect())
            .unwrap_or_default();
        found.sort_by(|a, b| a.id.cmp(&b.id));
        found
    }

    /// What `user` may do in `workspace`: what its token grants, except that the owners of a
    /// made workspace administer it, grants issued before it was made (or deleted) do not
    /// count, and in a read-only one nobody but its owners and admins writes.
    pub(crate) fn permission(&self, user: &UserInfo, workspace: &str) -> Option<Permission> {
        let granted = user.permission(workspace);
        if user.is_admin() || workspace == "public" {
            return granted;
        }
        let Ok(book) = self.workspaces.read() else {
            return None;
        };
        let Some(made) = book.get(workspace) else {
            return granted;
        };
        if made.owned_by(user) {
            return Some(Permission::Admin);
        }
        if !made.exists() && user.is_own_workspace(workspace) {
            // A user's own workspace is theirs again once the one they made is deleted.
            return granted;
        }
        let issued = user.token.as_ref().and_then(|t| t.issued_at);
        let held = match issued {
            Some(at) if made.counts_grant_issued(at) => {
                user.scope.workspaces.get(workspace).copied()
            }
            _ => None,
        };
        if made.described.read_only {
            return held.map(|p| p.min(Permission::Read));
        }
        held
    }

    /// Puts a workspace the caller has just stored into the book.
    pub(crate) fn put(&self, workspace: Workspace) {
        if let Ok(mut book) = self.workspaces.write() {
            book.insert(workspace.id.clone(), workspace);
        }
    }

    /// Applies rows read from the store; returns the ids of workspaces that are deleted now
    /// but were not before (their connections are to be closed).
    pub(crate) fn apply(&self, rows: &[WorkspaceRow]) -> Vec<String> {
        let mut gone = Vec::new();
        let Ok(mut book) = self.workspaces.write() else {
            return gone;
        };
        for row in rows {
            self.read_up_to.fetch_max(row.changed_at, Ordering::Relaxed);
            let Some(workspace) = Workspace::from_row(row) else {
                continue;
            };
            let was_live = book.get(&row.id).is_some_and(Workspace::exists);
            if was_live && !workspace.exists() {
                gone.push(row.id.clone());
            }
            book.insert(row.id.clone(), workspace);
        }
        gone
    }

    /// Drops deleted workspaces whose deletion is older than `before` (milliseconds).
    pub(crate) fn forget_deleted_before(&self, before: i64) {
        if let Ok(mut book) = self.workspaces.write() {
            book.retain(|_, w| w.deleted_at.is_none_or(|at| at >= before));
        }
    }

    /// From when (milliseconds) the next reload reads.
    pub(crate) fn reload_from(&self) -> i64 {
        let up_to = self.read_up_to.load(Ordering::Relaxed);
        if up_to == 0 {
            0
        } else {
            up_to - RELOAD_OVERLAP_MS
        }
    }

    /// Live workspaces `created_by` made.
    #[cfg(test)]
    fn count_by(&self, created_by: &str) -> usize {
        self.existing()
            .iter()
            .filter(|w| w.created_by == created_by)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::TokenRef;
    use crate::auth::user::Purpose;
    use crate::ids::{UserId, WorkspaceId};

    fn row(id: &str, owners: &[&str], created_at: i64, deleted_at: Option<i64>) -> WorkspaceRow {
        let described = Description {
            name: id.into(),
            owners: owners.iter().map(|o| o.to_string()).collect(),
            ..Default::default()
        };
        WorkspaceRow {
            id: id.into(),
            info: serde_json::to_string(&described).unwrap(),
            created_by: owners[0].into(),
            created_at: created_at * 1000,
            changed_at: created_at * 1000,
            deleted_at: deleted_at.map(|d| d * 1000),
        }
    }

    fn holder(id: &str, workspace: &str, permission: Permission, issued_at: i64) -> UserInfo {
        let mut user = UserInfo::new(UserId::parse(id).unwrap(), vec![], None);
        user.scope
            .workspaces
            .insert(WorkspaceId::parse(workspace).unwrap(), permission);
        user.token = Some(TokenRef {
            id: format!("token-{id}"),
            lineage: vec![],
            expires_at: issued_at + 3600,
            issued_at: Some(issued_at),
            purpose: Purpose::General,
        });
        user
    }

    #[test]
    fn owners_administer_and_old_grants_do_not_count() {
        let book = WorkspaceBook::default();
        assert!(
            book.apply(&[row("lab-a", &["alice"], 1000, None)])
                .is_empty()
        );
        let alice = holder("alice", "elsewhere", Permission::Read, 900);
        assert_eq!(book.permission(&alice, "lab-a"), Some(Permission::Admin));
        // A derived token of the owner does not own.
        let mut child = holder("alice-x1", "lab-a", Permission::Read, 1001);
        child.parent = Some(UserId::parse("alice").unwrap());
        assert_eq!(book.permission(&child, "lab-a"), Some(Permission::Read));
        // A grant minted before the workspace was made names another, older workspace.
        let old = holder("bob", "lab-a", Permission::ReadWrite, 997);
        assert_eq!(book.permission(&old, "lab-a"), None);
        // One minted as it was made counts, whatever the whole seconds of `iat` hide.
        let fresh = holder("bob", "lab-a", Permission::ReadWrite, 999);
        assert_eq!(
            book.permission(&fresh, "lab-a"),
            Some(Permission::ReadWrite)
        );
        // Workspaces nobody made are what tokens say.
        assert_eq!(
            book.permission(&old, "other-ws"),
            old.permission("other-ws")
        );
    }

    #[test]
    fn deletion_voids_grants_and_is_reported_once() {
        let book = WorkspaceBook::default();
        book.apply(&[row("lab-b", &["alice"], 1000, None)]);
        assert_eq!(book.count_by("alice"), 1);
        let bob = holder("bob", "lab-b", Permission::ReadWrite, 1500);
        assert_eq!(book.permission(&bob, "lab-b"), Some(Permission::ReadWrite));
        let deleted = row("lab-b", &["alice"], 1000, Some(2000));
        assert_eq!(book.apply(std::slice::from_ref(&deleted)), vec!["lab-b"]);
        assert!(book.apply(&[deleted]).is_empty(), "reported once");
        assert_eq!(book.permission(&bob, "lab-b"), None);
        let alice = holder("alice", "x-y", Permission::Read, 900);
        assert_eq!(
            book.permission(&alice, "lab-b"),
            None,
            "no owner once deleted"
        );
        assert_eq!(book.count_by("alice"), 0);
        // Taken again by carol at once: bob's old grant, issued in the very second it was
        // deleted, still does not count; one issued after does.
        let gone = book.get("lab-b").unwrap();
        let remade = gone.remade_at(2000 * 1000);
        assert!(remade > 2000 * 1000 + CLOCK_SLACK_MS);
        let mut again = row("lab-b", &["carol"], 0, None);
        again.created_at = remade;
        book.apply(&[again]);
        let same_second = holder("bob", "lab-b", Permission::ReadWrite, 2000);
        assert_eq!(book.permission(&same_second, "lab-b"), None);
        let later = holder("dave", "lab-b", Permission::Read, 2001);
        assert_eq!(book.permission(&later, "lab-b"), Some(Permission::Read));
        book.forget_deleted_before(10_000_000);
        assert!(book.get("lab-b").is_some(), "a live one is kept");
    }

    #[test]
    fn read_only_workspaces_cap_grants_at_read() {
        let book = WorkspaceBook::default();
        let mut r = row("docs-ro", &["alice"], 1000, None);
        let mut described: Description = serde_json::from_str(&r.info).unwrap();
        described.read_only = true;
        r.info = serde_json::to_string(&described).unwrap();
        book.apply(&[r]);
        let bob = holder("bob", "docs-ro", Permission::Admin, 1500);
        assert_eq!(book.permission(&bob, "docs-ro"), Some(Permission::Read));
        let alice = holder("alice", "x-y", Permission::Read, 900);
        assert_eq!(book.permission(&alice, "docs-ro"), Some(Permission::Admin));
    }
}
