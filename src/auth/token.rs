//! HS256 tokens with Hypha's claim set, so tokens interoperate with existing Hypha deployments.
//! Every claim is parsed into its type on the way in (the same checks on every path: websocket,
//! HTTP, reconnection), and tokens are minted only from typed values. Our tokens also carry a
//! `jti`, the ids of the tokens they were derived from (`lineage`) and, for reconnection
//! tokens, `use: "reconnection"`; Hypha ignores these claims.

use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::scope::{Scope, ScopeError};
use super::user::{Purpose, TokenRef, UserInfo};
use crate::ids::UserId;

pub(crate) const ISSUER: &str = "https://amun.ai/";
pub(crate) const AUDIENCE: &str = "https://amun-ai.eu.auth0.com/api/v2/";

/// Longest token accepted, in bytes.
pub(crate) const MAX_TOKEN_LEN: usize = 8 * 1024;
/// How many generations of derived tokens a token may descend from.
pub(crate) const MAX_LINEAGE: usize = 10;
/// Longest lifetime of any token minted here.
pub(crate) const MAX_LIFETIME: i64 = 365 * 24 * 3600;

/// Why a token was refused; the text is what the client is told.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TokenError {
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (its nbf is in the future)")]
    NotYetValid,
    #[error("the token signature is invalid")]
    BadSignature,
    #[error("the token algorithm is not allowed (only HS256 is accepted)")]
    BadAlgorithm,
    #[error("the token was not issued for this server (issuer or audience mismatch)")]
    WrongIssuer,
    #[error("the token is malformed: {0}")]
    Malformed(&'static str),
    #[error("the token's {0} is not valid: {1}")]
    BadClaim(&'static str, String),
    #[error("the token has been revoked")]
    Revoked,
    #[error(
        "this is a reconnection token: it only lets the client it was issued to reconnect, it does not sign in"
    )]
    ReconnectionOnly,
    #[error("the token is derived from too many generations of tokens (at most {MAX_LINEAGE})")]
    TooDeep,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    aud: serde_json::Value,
    #[serde(default)]
    iat: Option<i64>,
    exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<i64>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gty: Option<String>,
    #[serde(rename = "https://amun.ai/roles", default)]
    roles: Option<Vec<String>>,
    #[serde(rename = "https://amun.ai/email", default)]
    email: Option<String>,
    #[serde(
        rename = "https://amun.ai/parent",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    parent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    jti: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    lineage: Vec<String>,
    #[serde(rename = "use", default, skip_serializing_if = "Option::is_none")]
    purpose: Option<String>,
}

/// Verifies and mints tokens with one shared secret, and knows which token families are revoked.
pub struct TokenIssuer {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    /// Ids of revoked tokens with the time each would have expired (persisted by the store,
    /// loaded at start, announced to all); an expired one is forgotten, as every token
    /// derived from it has expired too.
    revoked: std::sync::RwLock<std::collections::HashMap<String, i64>>,
    /// Revocations each account may ask for per minute, so none can grow the list at will.
    revocations: governor::DefaultKeyedRateLimiter<crate::ids::UserId>,
    /// Tokens that passed `verify` lately, by their exact text, with what they proved: a
    /// hit skips the signature and the parsing of the claims (most of a request's cost),
    /// never the expiry and revocation checks. Bounded; emptied when full.
    verified: std::sync::RwLock<std::collections::HashMap<Box<str>, Arc<UserInfo>>>,
}

/// Tokens remembered by `TokenIssuer::verify` (each at most `MAX_CACHED_LEN` bytes).
const MAX_CACHED: usize = 4096;
const MAX_CACHED_LEN: usize = 2048;

/// Revocations one account may make per minute (admins are not held to it).
pub const REVOCATIONS_PER_MINUTE: u32 = 60;

/// The SHA-256 of a token: the id of tokens minted without a `jti` (never the token itself
/// is kept).
pub(crate) fn fingerprint(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bare(token).as_bytes()))
}

/// The token without `Bearer ` and surrounding blanks.
fn bare(token: &str) -> &str {
    let token = token.trim();
    token.strip_prefix("Bearer ").unwrap_or(token).trim()
}

/// A token id: what a `jti` or a lineage entry may be.
fn valid_token_id(id: &str) -> bool {
    (8..=64).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn valid_role(role: &str) -> bool {
    (1..=64).contains(&role.len())
        && role
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:|".contains(c))
}

/// An email claim: plain text of a sensible length, no control characters.
fn valid_email(email: &str) -> bool {
    email.len() <= 254 && !email.chars().any(|c| c.is_control())
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenIssuer { secret: [redacted] }")
    }
}

impl TokenIssuer {
    pub(crate) fn new(secret: &SecretString) -> Self {
        let bytes = secret.expose_secret().as_bytes();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.leeway = 5;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        Self {
            encoding: EncodingKey::from_secret(bytes),
            decoding: DecodingKey::from_secret(bytes),
            validation,
            revoked: Default::default(),
            revocations: governor::RateLimiter::keyed(governor::Quota::per_minute(
                std::num::NonZeroU32::new(REVOCATIONS_PER_MINUTE)
                    .unwrap_or(std::num::NonZeroU32::MIN),
            )),
            verified: Default::default(),
        }
    }

    /// Counts a revocation asked for by `account`; false when it has asked for too many.
    pub(crate) fn may_revoke(&self, account: &crate::ids::UserId) -> bool {
        self.revocations.check_key(account).is_ok()
    }

    /// Forgets the revocation counts of accounts that have not revoked for a while.
    pub(crate) fn prune_limits(&self) {
        self.revocations.retain_recent();
        self.revocations.shrink_to_fit();
    }

    /// Refuses a token that expires at `expires_at`, and every token derived from it, from
    /// now on. Returns whether the id was new.
    pub(crate) fn mark_revoked(&self, id: String, expires_at: i64) -> bool {
        let mut revoked = self.revoked.write().unwrap_or_else(|p| p.into_inner());
        revoked.insert(id, expires_at).is_none()
    }

    /// Forgets revocations of tokens that have expired since (with the leeway `verify` allows).
    pub fn prune_revoked(&self, now: i64) {
        let mut revoked = self.revoked.write().unwrap_or_else(|p| p.into_inner());
        let leeway = self.validation.leeway as i64;
        // Saturating: a token that never expires (`exp` near `i64::MAX`) stays revoked.
        revoked.retain(|_, expires_at| expires_at.saturating_add(leeway) >= now);
    }

    /// How many revocations are remembered (for metrics and tests).
    pub fn revoked_count(&self) -> usize {
        self.revoked.read().map(|r| r.len()).unwrap_or(0)
    }

    /// Whether the token, or one it was derived from, is revoked.
    pub(crate) fn is_revoked(&self, token: &TokenRef) -> bool {
        self.revoked.read().is_ok_and(|revoked| {
            !revoked.is_empty() && token.family().any(|id| revoked.contains_key(id))
        })
    }

    /// Verifies a token (raw or `Bearer ...`) for signing in; reconnection tokens are refused.
    pub fn parse(&self, token: &str) -> Result<UserInfo, TokenError> {
        self.parse_shared(token).map(Arc::unwrap_or_clone)
    }

    /// [`parse`](Self::parse), answering with the remembered user itself (no copy of it per
    /// request).
    pub fn parse_shared(&self, token: &str) -> Result<Arc<UserInfo>, TokenError> {
        let user = self.verify_shared(token)?;
        match user.token.as_ref().map(|t| t.purpose) {
            Some(Purpose::Reconnection) => Err(TokenError::ReconnectionOnly),
            _ => Ok(user),
        }
    }

    /// Verifies a token of any purpose (reconnection tokens included) and returns the user
    /// it names, its scope and its family.
    pub fn verify(&self, token: &str) -> Result<UserInfo, TokenError> {
        self.verify_shared(token).map(Arc::unwrap_or_clone)
    }

    fn verify_shared(&self, token: &str) -> Result<Arc<UserInfo>, TokenError> {
        let token = bare(token);
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed("it is longer than 8 KiB"));
        }
        let now = super::now_secs();
        let known = self
            .verified
            .read()
            .ok()
            .and_then(|verified| verified.get(token).cloned());
        if let Some(user) = known
            && let Some(proof) = &user.token
            // The checks that time and revocation can change; the rest held when it was
            // verified and cannot change (nbf only moves into the past).
            && proof.expires_at >= now.saturating_sub(self.validation.leeway as i64)
        {
            if self.is_revoked(proof) {
                return Err(TokenError::Revoked);
            }
            return Ok(user);
        }
        let user = Arc::new(self.verify_uncached(token)?);
        if token.len() <= MAX_CACHED_LEN
            && let Ok(mut verified) = self.verified.write()
        {
            if verified.len() >= MAX_CACHED {
                verified.clear();
            }
            verified.insert(token.into(), user.clone());
        }
        Ok(user)
    }

    /// `verify` without the cache: the signature, every claim, the revocations.
    fn verify_uncached(&self, token: &str) -> Result<UserInfo, TokenError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                ErrorKind::InvalidSignature => TokenError::BadSignature,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    TokenError::BadAlgorithm
                }
                ErrorKind::InvalidIssuer | ErrorKind::InvalidAudience => TokenError::WrongIssuer,
                ErrorKind::InvalidToken => {
                    TokenError::Malformed("it is not a JWT (three base64url parts joined by dots)")
                }
                ErrorKind::Base64(_) => TokenError::Malformed("a part of it is not base64url"),
                ErrorKind::Json(_) | ErrorKind::Utf8(_) => TokenError::Malformed(
                    "its header or claims are not the JSON expected (check the claim types)",
                ),
                ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
                    "exp" => TokenError::Malformed("the exp claim is missing"),
                    "sub" => TokenError::Malformed("the sub claim is missing"),
                    "iss" => TokenError::Malformed("the iss claim is missing"),
                    _ => TokenError::Malformed("the aud claim is missing"),
                },
                _ => TokenError::Malformed("it cannot be read"),
            })?;
        let claims = data.claims;
        let purpose = match claims.purpose.as_deref() {
            None => Purpose::General,
            Some("reconnection") => Purpose::Reconnection,
            Some(_) => return Err(TokenError::BadClaim("use", "unknown purpose".into())),
        };
        let id = match claims.jti {
            Some(jti) if valid_token_id(&jti) => jti,
            Some(_) => {
                return Err(TokenError::BadClaim(
                    "jti",
                    "8 to 64 letters, digits, - or _".into(),
                ));
            }
            None => fingerprint(token),
        };
        if claims.lineage.len() > MAX_LINEAGE {
            return Err(TokenError::TooDeep);
        }
        if !claims.lineage.iter().all(|id| valid_token_id(id)) {
            return Err(TokenError::BadClaim(
                "lineage",
                "entries are token ids".into(),
            ));
        }
        let token_ref = TokenRef {
            id,
            lineage: claims.lineage,
            expires_at: claims.exp,
            issued_at: claims.iat,
            purpose,
        };
        if self.is_revoked(&token_ref) {
            return Err(TokenError::Revoked);
        }
        let sub =
            UserId::parse(claims.sub).map_err(|e| TokenError::BadClaim("sub", e.to_string()))?;
        let roles = claims.roles.unwrap_or_default();
        if roles.len() > 16 || !roles.iter().all(|r| valid_role(r)) {
            return Err(TokenError::BadClaim(
                "roles",
                "at most 16 names of letters, digits and - _ . : |".into(),
            ));
        }
        if let Some(email) = &claims.email
            && !valid_email(email)
        {
            return Err(TokenError::BadClaim(
                "email",
                "at most 254 characters, no control characters".into(),
            ));
        }
        let parent = claims
            .parent
            .map(UserId::parse)
            .transpose()
            .map_err(|e| TokenError::BadClaim("parent", e.to_string()))?;
        let scope = Scope::parse(claims.scope.as_deref().unwrap_or(""))
            .map_err(|e: ScopeError| TokenError::BadClaim("scope", e.to_string()))?;
        let mut user = UserInfo::new(sub, roles, Some(claims.exp));
        user.email = claims.email;
        user.parent = parent;
        user.scope = scope;
        user.token = Some(token_ref);
        Ok(user)
    }

    /// Mints a token for `user` with its scope: a new family, valid for `expires_in` seconds
    /// (sign-in, the `token` command).
    pub fn issue(&self, user: &UserInfo, expires_in: i64) -> String {
        let now = super::now_secs();
        self.mint(
            user,
            now + expires_in.min(MAX_LIFETIME),
            Purpose::General,
            new_id(),
            Vec::new(),
        )
    }

    /// Mints a token derived from `from` (a child from `generate_token`): it joins `from`'s
    /// family, so revoking `from` refuses it, and never outlives it.
    pub(crate) fn issue_child(
        &self,
        from: &TokenRef,
        child: &UserInfo,
        expires_at: i64,
    ) -> Result<String, TokenError> {
        if from.purpose != Purpose::General {
            return Err(TokenError::ReconnectionOnly);
        }
        let lineage: Vec<String> = from.family().map(str::to_string).collect();
        if lineage.len() > MAX_LINEAGE {
            return Err(TokenError::TooDeep);
        }
        Ok(self.mint(
            child,
            expires_at.min(from.expires_at),
            Purpose::General,
            new_id(),
            lineage,
        ))
    }

    /// Mints the reconnection token of a connection whose identity is `user` (with the
    /// connection's client and workspace in its scope). It never outlives the token the
    /// connection was opened with; refreshing a reconnection token keeps its id, so revoking
    /// it reaches every refresh. Returns the token and when it expires.
    pub(crate) fn issue_reconnection(&self, user: &UserInfo, life_time: i64) -> (String, i64) {
        let now = super::now_secs();
        let fresh = now + life_time.min(MAX_LIFETIME);
        let (expires_at, id, lineage) = match &user.token {
            None => (fresh, new_id(), Vec::new()),
            Some(t) if t.purpose == Purpose::General => (
                fresh.min(t.expires_at),
                new_id(),
                t.family().map(str::to_string).collect(),
            ),
            // An anonymous chain (no token at its root) is renewed like Hypha's; one that
            // started from a token stays within that token's life.
            Some(t) if t.lineage.is_empty() => (fresh, t.id.clone(), Vec::new()),
            Some(t) => (fresh.min(t.expires_at), t.id.clone(), t.lineage.clone()),
        };
        let token = self.mint(user, expires_at, Purpose::Reconnection, id, lineage);
        (token, expires_at)
    }

    fn mint(
        &self,
        user: &UserInfo,
        expires_at: i64,
        purpose: Purpose,
        id: String,
        lineage: Vec<String>,
    ) -> String {
        let now = super::now_secs();
        let claims = Claims {
            iss: ISSUER.into(),
            sub: user.id.to_string(),
            aud: AUDIENCE.into(),
            iat: Some(now),
            exp: expires_at,
            nbf: None,
            scope: Some(user.scope.to_claim()),
            gty: Some("client-credentials".into()),
            roles: Some(user.roles.clone()),
            email: user.email.clone(),
            parent: user.parent.as_ref().map(ToString::to_string),
            jti: Some(id),
            lineage,
            purpose: (purpose == Purpose::Reconnection).then(|| "reconnection".to_string()),
        };
        // Encoding a plain struct with an HMAC key cannot fail.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .unwrap_or_default()
    }
}

/// A new token id: 128 random bits.
fn new_id() -> String {
    crate::ids::random_id(25)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Permission;
    use crate::ids::{ClientId, WorkspaceId};

    fn issuer(secret: &str) -> TokenIssuer {
        TokenIssuer::new(&SecretString::from(secret.to_string()))
    }

    fn user(id: &str) -> UserInfo {
        UserInfo::new(UserId::parse(id).unwrap(), vec![], None)
    }

    #[test]
    fn remembered_tokens_are_still_checked_for_revocation_and_expiry() {
        let tokens = issuer("s3cret");
        let token = tokens.issue(&user("alice"), 60);
        let first = tokens.parse(&token).unwrap();
        // The second verification comes from the cache, with the same result.
        assert_eq!(tokens.parse(&format!("Bearer {token}")).unwrap(), first);
        let proof = first.token.clone().unwrap();
        assert!(tokens.mark_revoked(proof.id.clone(), proof.expires_at));
        assert_eq!(tokens.parse(&token), Err(TokenError::Revoked));
        // A remembered proof that has expired is not taken: the token is verified again
        // (here a text that is no token at all).
        let mut stale = first.clone();
        if let Some(t) = stale.token.as_mut() {
            t.expires_at = crate::auth::now_secs() - 60;
        }
        tokens
            .verified
            .write()
            .unwrap()
            .insert("not-a-token".into(), Arc::new(stale));
        assert!(matches!(
            tokens.parse("not-a-token"),
            Err(TokenError::Malformed(_))
        ));
        // Bounded: filling it past its size empties it.
        for i in 0..MAX_CACHED + 10 {
            tokens
                .verified
                .write()
                .unwrap()
                .insert(format!("t{i}").into(), Arc::new(first.clone()));
            let _ = tokens.parse(&tokens.issue(&user("bob"), 60 + i as i64));
        }
        assert!(tokens.verified.read().unwrap().len() <= MAX_CACHED);
    }

    #[test]
    fn round_trip_keeps_scope() {
        let tokens = issuer("s3cret");
        let mut alice = UserInfo::new(UserId::parse("alice").unwrap(), vec!["admin".into()], None);
        alice.email = Some("a@example.org".into());
        alice
            .scope
            .workspaces
            .insert(WorkspaceId::parse("lab").unwrap(), Permission::ReadWrite);
        alice.scope.client = Some(ClientId::parse("c1").unwrap());
        alice.scope.current = Some(WorkspaceId::parse("lab").unwrap());
        let parsed = tokens
            .parse(&format!("Bearer {}", tokens.issue(&alice, 60)))
            .unwrap();
        assert_eq!(parsed.id.as_str(), "alice");
        assert_eq!(parsed.scope, alice.scope);
        assert_eq!(parsed.email.as_deref(), Some("a@example.org"));
        assert!(parsed.is_admin());
        assert_eq!(parsed.token.unwrap().purpose, Purpose::General);
    }

    #[test]
    fn refuses_bad_tokens() {
        let bob = user("bob");
        let token = issuer("one").issue(&bob, 60);
        assert_eq!(issuer("two").parse(&token), Err(TokenError::BadSignature));
        assert_eq!(
            issuer("one").parse(&issuer("one").issue(&bob, -3600)),
            Err(TokenError::Expired)
        );
        assert!(matches!(
            issuer("one").parse("garbage"),
            Err(TokenError::Malformed(_))
        ));
        assert!(!TokenError::Malformed("x").to_string().contains("Error("));
        // alg "none": header {"alg":"none","typ":"JWT"}, no signature.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ4In0.";
        assert!(issuer("one").parse(none).is_err());
    }

    #[test]
    fn revoking_a_token_reaches_its_children_and_reconnections() {
        let tokens = issuer("k");
        let parent = tokens.parse(&tokens.issue(&user("alice"), 3600)).unwrap();
        let from = parent.token.clone().unwrap();
        let mut child = user("alice-c1");
        child.parent = Some(parent.id.clone());
        let child_token = tokens
            .issue_child(&from, &child, from.expires_at + 1_000_000)
            .unwrap();
        let child_user = tokens.parse(&child_token).unwrap();
        assert!(child_user.token.as_ref().unwrap().expires_at <= from.expires_at);
        let (recon, recon_exp) = tokens.issue_reconnection(&child_user, 172_800);
        assert!(recon_exp <= from.expires_at);
        assert_eq!(tokens.parse(&recon), Err(TokenError::ReconnectionOnly));
        assert!(tokens.verify(&recon).is_ok());
        tokens.mark_revoked(from.id.clone(), from.expires_at);
        assert_eq!(tokens.parse(&child_token), Err(TokenError::Revoked));
        assert_eq!(tokens.verify(&recon), Err(TokenError::Revoked));
        // Still remembered while the token could be used; forgotten once it has expired.
        tokens.prune_revoked(crate::auth::now_secs());
        assert_eq!(tokens.verify(&recon), Err(TokenError::Revoked));
        tokens.prune_revoked(from.expires_at + 3600);
        assert_eq!(tokens.revoked_count(), 0);
        // A token that never expires stays revoked (no overflow, no panic, never forgotten).
        tokens.mark_revoked("forever".into(), i64::MAX);
        tokens.prune_revoked(crate::auth::now_secs());
        tokens.prune_revoked(i64::MAX);
        assert_eq!(tokens.revoked_count(), 1);
    }

    #[test]
    fn a_refreshed_reconnection_token_keeps_its_id() {
        let tokens = issuer("k");
        let mut anon = UserInfo::anonymous(600);
        anon.scope.client = Some(ClientId::parse("c").unwrap());
        let (first, _) = tokens.issue_reconnection(&anon, 100);
        let resumed = tokens.verify(&first).unwrap();
        let (second, _) = tokens.issue_reconnection(&resumed, 100);
        let again = tokens.verify(&second).unwrap();
        assert_eq!(again.token.as_ref().unwrap().id, resumed.token.unwrap().id);
        assert!(again.token.unwrap().lineage.is_empty());
    }
}
