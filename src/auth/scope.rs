//! Token scopes in Hypha's grammar: `ws:<workspace>#<r|rw|a>`, `cid:<client>`,
//! `wid:<workspace>` and extra scopes. A scope is parsed into typed values and written back
//! only from them, so no text a caller supplies can add a word to a token's scope.

use std::collections::BTreeMap;
use std::fmt;

use super::Permission;
use crate::ids::{ClientId, WorkspaceId};

/// Most workspace grants one token may carry.
pub(crate) const MAX_GRANTS: usize = 64;
/// Most extra scopes one token may carry.
pub(crate) const MAX_EXTRA: usize = 16;
/// Longest scope string accepted in a token.
pub(crate) const MAX_SCOPE_LEN: usize = 8 * 1024;

/// Why a scope was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum ScopeError {
    #[error("the scope {0:?} is not valid: {1}")]
    Invalid(String, String),
    #[error(
        "the scope has too many entries (at most {MAX_GRANTS} workspaces and {MAX_EXTRA} extra scopes)"
    )]
    TooMany,
    #[error("the scope is longer than {MAX_SCOPE_LEN} characters")]
    TooLong,
}

/// An extra scope such as `file:download`: a restriction a token carries besides its
/// workspace grants. Letters, digits and `_ . : | / @ * + -`, at most 128 characters, and
/// never one of the structural prefixes (`ws:`, `cid:`, `wid:`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExtraScope(String);

impl ExtraScope {
    pub(crate) fn parse(text: &str) -> Result<Self, ScopeError> {
        let bad = |why: &str| Err(ScopeError::Invalid(shorten(text), why.to_string()));
        if text.is_empty() || text.len() > 128 {
            return bad("an extra scope has 1 to 128 characters");
        }
        if !text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.:|/@*+-".contains(c))
        {
            return bad("an extra scope may only hold letters, digits and _ . : | / @ * + -");
        }
        if ["ws:", "cid:", "wid:"].iter().any(|p| text.starts_with(p)) {
            return bad("ws:, cid: and wid: are not extra scopes");
        }
        Ok(Self(text.to_string()))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the scope restricts the token to one purpose (`file:download`), which
    /// Hypha refuses for general (websocket) use.
    pub(crate) fn is_specialized(&self) -> bool {
        self.0.contains(':')
    }
}

impl fmt::Display for ExtraScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn shorten(text: &str) -> String {
    text.chars().take(80).collect()
}

/// What a token grants: workspaces with their permission, the one client and workspace it
/// is bound to (if any), and extra scopes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scope {
    pub workspaces: BTreeMap<WorkspaceId, Permission>,
    /// `cid:`: the only client id the token may connect as.
    pub client: Option<ClientId>,
    /// `wid:`: the workspace the token is bound to.
    pub current: Option<WorkspaceId>,
    pub extra: Vec<ExtraScope>,
}

impl Scope {
    /// Parses a token's `scope` claim; every word must be well formed.
    pub(crate) fn parse(text: &str) -> Result<Self, ScopeError> {
        if text.len() > MAX_SCOPE_LEN {
            return Err(ScopeError::TooLong);
        }
        let mut scope = Scope::default();
        for word in text.split_whitespace() {
            let invalid = |e: &dyn fmt::Display| ScopeError::Invalid(shorten(word), e.to_string());
            if let Some(grant) = word.strip_prefix("ws:") {
                let (ws, code) = grant.rsplit_once('#').unwrap_or((grant, "r"));
                let ws = WorkspaceId::parse(ws).map_err(|e| invalid(&e))?;
                let permission = Permission::from_code(code)
                    .ok_or_else(|| invalid(&"the permission must be r, rw or a"))?;
                let slot = scope.workspaces.entry(ws).or_insert(permission);
                *slot = (*slot).max(permission);
            } else if let Some(cid) = word.strip_prefix("cid:") {
                scope.client = Some(ClientId::parse(cid).map_err(|e| invalid(&e))?);
            } else if let Some(wid) = word.strip_prefix("wid:") {
                scope.current = Some(WorkspaceId::parse(wid).map_err(|e| invalid(&e))?);
            } else {
                scope.extra.push(ExtraScope::parse(word)?);
            }
            if scope.workspaces.len() > MAX_GRANTS || scope.extra.len() > MAX_EXTRA {
                return Err(ScopeError::TooMany);
            }
        }
        Ok(scope)
    }

    /// The `scope` claim: space-separated words built from the typed values.
    pub fn to_claim(&self) -> String {
        let mut words: Vec<String> = self
            .workspaces
            .iter()
            .map(|(ws, p)| format!("ws:{ws}#{}", p.code()))
            .collect();
        if let Some(wid) = &self.current {
            words.push(format!("wid:{wid}"));
        }
        if let Some(cid) = &self.client {
            words.push(format!("cid:{cid}"));
        }
        words.extend(self.extra.iter().map(ToString::to_string));
        words.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_typed_words() {
        let scope = Scope::parse("ws:lab#rw ws:x wid:lab cid:c1 file:download").unwrap();
        assert_eq!(scope.workspaces.get("lab"), Some(&Permission::ReadWrite));
        assert_eq!(scope.workspaces.get("x"), Some(&Permission::Read));
        assert_eq!(scope.client.as_ref().map(ClientId::as_str), Some("c1"));
        assert!(scope.extra[0].is_specialized());
        assert_eq!(Scope::parse(&scope.to_claim()).unwrap(), scope);
    }

    #[test]
    fn malformed_words_are_refused() {
        for bad in [
            "ws:a/b#a",
            "ws:lab#root",
            "cid:a/b",
            "wid:",
            "ws:#a",
            "bad\u{7}scope",
            "extra#",
        ] {
            assert!(Scope::parse(bad).is_err(), "{bad}");
        }
        assert!(ExtraScope::parse("ws:public#a").is_err());
        assert!(ExtraScope::parse("x y").is_err());
        let many = (0..70).map(|i| format!("ws:w{i}#r")).collect::<Vec<_>>();
        assert_eq!(Scope::parse(&many.join(" ")), Err(ScopeError::TooMany));
    }
}
