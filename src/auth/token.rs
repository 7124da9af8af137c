//! HS256 tokens with Hypha's claim set, so tokens interoperate with existing Hypha deployments.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::user::{Permission, UserInfo};

pub const ISSUER: &str = "https://amun.ai/";
pub const AUDIENCE: &str = "https://amun-ai.eu.auth0.com/api/v2/";
pub const NAMESPACE: &str = "https://amun.ai/";

/// Why a token was refused; the text is what the client is told.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TokenError {
    #[error("the token has expired")]
    Expired,
    #[error("the token signature is invalid")]
    BadSignature,
    #[error("the token algorithm is not allowed (only HS256 is accepted)")]
    BadAlgorithm,
    #[error("the token was not issued for this server (issuer or audience mismatch)")]
    WrongIssuer,
    #[error("the token is malformed: {0}")]
    Malformed(String),
    #[error("the token has been revoked")]
    Revoked,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    aud: serde_json::Value,
    #[serde(default)]
    iat: Option<i64>,
    exp: i64,
    #[serde(default)]
    scope: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gty: Option<String>,
    #[serde(rename = "https://amun.ai/roles", default)]
    roles: Vec<String>,
    #[serde(rename = "https://amun.ai/email", default)]
    email: Option<String>,
    #[serde(
        rename = "https://amun.ai/parent",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    parent: Option<String>,
}

/// Verifies and mints tokens with one shared secret.
pub struct TokenIssuer {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    /// SHA-256 fingerprints of revoked tokens (persisted by the store, loaded at start).
    revoked: std::sync::RwLock<std::collections::HashSet<String>>,
}

/// The SHA-256 of a token, as revocations are kept (never the token itself).
pub fn fingerprint(token: &str) -> String {
    use sha2::Digest;
    let token = token.trim();
    let token = token.strip_prefix("Bearer ").unwrap_or(token).trim();
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenIssuer { secret: [redacted] }")
    }
}

impl TokenIssuer {
    pub fn new(secret: &SecretString) -> Self {
        let bytes = secret.expose_secret().as_bytes();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        Self {
            encoding: EncodingKey::from_secret(bytes),
            decoding: DecodingKey::from_secret(bytes),
            validation,
            revoked: Default::default(),
        }
    }

    /// Refuses a token from now on.
    pub fn mark_revoked(&self, fingerprint: String) {
        if let Ok(mut revoked) = self.revoked.write() {
            revoked.insert(fingerprint);
        }
    }

    /// Verifies a token (raw or `Bearer ...`) and returns the user it names.
    pub fn parse(&self, token: &str) -> Result<UserInfo, TokenError> {
        let token = token.trim();
        let token = token.strip_prefix("Bearer ").unwrap_or(token).trim();
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::InvalidSignature => TokenError::BadSignature,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    TokenError::BadAlgorithm
                }
                ErrorKind::InvalidIssuer | ErrorKind::InvalidAudience => TokenError::WrongIssuer,
                other => TokenError::Malformed(format!("{other:?}")),
            })?;
        let claims = data.claims;
        if self
            .revoked
            .read()
            .is_ok_and(|r| !r.is_empty() && r.contains(&fingerprint(token)))
        {
            return Err(TokenError::Revoked);
        }
        if claims.sub.is_empty() || claims.sub.len() > 200 {
            return Err(TokenError::Malformed("bad subject".into()));
        }
        let mut user = UserInfo::new(claims.sub, claims.roles, Some(claims.exp));
        user.email = claims.email;
        user.parent = claims.parent;
        for part in claims.scope.split_whitespace() {
            if let Some(grant) = part.strip_prefix("ws:") {
                let (ws, code) = grant.rsplit_once('#').unwrap_or((grant, "r"));
                let permission = Permission::parse(code).ok_or_else(|| {
                    TokenError::Malformed(format!("unknown permission in {part}"))
                })?;
                user.workspaces.insert(ws.to_string(), permission);
            } else if let Some(cid) = part.strip_prefix("cid:") {
                user.client_id = Some(cid.to_string());
            } else if let Some(wid) = part.strip_prefix("wid:") {
                user.current_workspace = Some(wid.to_string());
            } else {
                user.extra_scopes.push(part.to_string());
            }
        }
        Ok(user)
    }

    /// Mints a token for `user` carrying its scope, valid for `expires_in` seconds.
    pub fn issue(&self, user: &UserInfo, expires_in: i64) -> String {
        let now = super::now_secs();
        let mut scope: Vec<String> = user
            .workspaces
            .iter()
            .map(|(ws, p)| format!("ws:{ws}#{}", p.code()))
            .collect();
        if let Some(wid) = &user.current_workspace {
            scope.push(format!("wid:{wid}"));
        }
        if let Some(cid) = &user.client_id {
            scope.push(format!("cid:{cid}"));
        }
        scope.extend(user.extra_scopes.iter().cloned());
        let claims = Claims {
            iss: ISSUER.into(),
            sub: user.id.clone(),
            aud: AUDIENCE.into(),
            iat: Some(now),
            exp: now + expires_in,
            scope: scope.join(" "),
            gty: Some("client-credentials".into()),
            roles: user.roles.clone(),
            email: user.email.clone(),
            parent: user.parent.clone(),
        };
        // Encoding a plain struct with an HMAC key cannot fail.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer(secret: &str) -> TokenIssuer {
        TokenIssuer::new(&SecretString::from(secret.to_string()))
    }

    #[test]
    fn round_trip_keeps_scope() {
        let tokens = issuer("s3cret");
        let mut user = UserInfo::new("alice".into(), vec!["admin".into()], None);
        user.email = Some("a@example.org".into());
        user.workspaces.insert("lab".into(), Permission::ReadWrite);
        user.client_id = Some("c1".into());
        user.current_workspace = Some("lab".into());
        let parsed = tokens
            .parse(&format!("Bearer {}", tokens.issue(&user, 60)))
            .unwrap();
        assert_eq!(parsed.id, "alice");
        assert_eq!(parsed.workspaces.get("lab"), Some(&Permission::ReadWrite));
        assert_eq!(parsed.client_id.as_deref(), Some("c1"));
        assert_eq!(parsed.current_workspace.as_deref(), Some("lab"));
        assert_eq!(parsed.email.as_deref(), Some("a@example.org"));
        assert!(parsed.is_admin());
    }

    #[test]
    fn refuses_bad_tokens() {
        let user = UserInfo::new("bob".into(), vec![], None);
        let token = issuer("one").issue(&user, 60);
        assert_eq!(issuer("two").parse(&token), Err(TokenError::BadSignature));
        assert_eq!(
            issuer("one").parse(&issuer("one").issue(&user, -3600)),
            Err(TokenError::Expired)
        );
        assert!(matches!(
            issuer("one").parse("garbage"),
            Err(TokenError::Malformed(_))
        ));
        // alg "none": header {"alg":"none","typ":"JWT"}, no signature.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ4In0.";
        assert!(issuer("one").parse(none).is_err());
        let one = issuer("one");
        let token = one.issue(&user, 60);
        one.mark_revoked(fingerprint(&token));
        assert_eq!(
            one.parse(&format!("Bearer {token}")),
            Err(TokenError::Revoked)
        );
    }
}
