//! Who a client is: a JWT (HS256 or RS256, `exp` required) becomes an [`Identity`]
//! whose `sub` is the actor of its writes and whose `role` claim is the Postgres role
//! its writes and snapshots run as. Without a configured key the bridge runs open
//! (for development): every client gets the default role.

use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("a token is required")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("invalid key configuration: {0}")]
    Key(String),
}

/// The identity a connection's statements run with.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Recorded as `livesync.actor` (the token's `sub`; else the client id).
    pub actor: String,
    /// The role to `SET LOCAL ROLE` to; None: the bridge's own role.
    pub role: Option<String>,
    /// The token's claims as JSON (`request.jwt.claims`); `{}` without a token.
    pub claims_json: String,
    /// The token's subject, which scopes the client ids it may use (None: auth off).
    pub subject: Option<String>,
    /// When the token expires (Unix seconds): the connection ends then.
    pub expires_at: Option<u64>,
}

impl Identity {
    /// Whether the token has expired (with the same leeway as at verification).
    pub fn expired(&self) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.expires_at.is_some_and(|exp| exp + 5 < now)
    }

    /// The client id livesync records for a client's writes. With auth on it is
    /// scoped by the token's subject (`<sub>/<client_id>`, `/` and `\` in the subject
    /// escaped), so one user cannot use (and so pre-empt) another's mutation ids.
    pub fn scoped_client_id(&self, client_id: &str) -> String {
        match &self.subject {
            None => client_id.to_string(),
            Some(sub) => {
                let mut scoped = String::with_capacity(sub.len() + client_id.len() + 1);
                for c in sub.chars() {
                    if c == '/' || c == '\\' {
                        scoped.push('\\');
                    }
                    scoped.push(c);
                }
                scoped.push('/');
                scoped.push_str(client_id);
                scoped
            }
        }
    }
}

/// Verifies tokens with the configured keys.
pub struct Authenticator {
    hs256: Option<DecodingKey>,
    rs256: Option<DecodingKey>,
    default_role: Option<String>,
}

impl Authenticator {
    pub fn from_config(config: &Config) -> Result<Self, AuthError> {
        let hs256 = config
            .jwt_secret
            .as_ref()
            .map(|s| DecodingKey::from_secret(s.as_bytes()))
            .transpose()
            .map_err(|e| AuthError::Key(e.to_string()))?;
        let rs256 = match &config.jwt_public_key {
            Some(pem) => Some(
                DecodingKey::from_rsa_pem(pem.as_bytes())
                    .map_err(|e| AuthError::Key(e.to_string()))?,
            ),
            None => None,
        };
        Ok(Authenticator {
            hs256,
            rs256,
            default_role: config.default_role.clone(),
        })
    }

    pub fn enabled(&self) -> bool {
        self.hs256.is_some() || self.rs256.is_some()
    }

    /// The identity for a connection's `hello` (or an HTTP request's bearer token).
    pub fn identify(&self, token: Option<&str>, client_id: &str) -> Result<Identity, AuthError> {
        if !self.enabled() {
            return Ok(Identity {
                actor: client_id.to_string(),
                role: self.default_role.clone(),
                claims_json: "{}".into(),
                subject: None,
                expires_at: None,
            });
        }
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let header = decode_header(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let key = match header.alg {
            Algorithm::HS256 => self.hs256.as_ref(),
            Algorithm::RS256 => self.rs256.as_ref(),
            _ => None,
        }
        .ok_or_else(|| AuthError::Invalid(format!("algorithm {:?} is not accepted", header.alg)))?;
        let mut validation = Validation::new(header.alg);
        validation.set_required_spec_claims(&["exp"]);
        validation.validate_exp = true;
        validation.leeway = 5;
        validation.validate_aud = false;
        let data = decode::<Map<String, Value>>(token, key, &validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        let claims = data.claims;
        let actor = match claims.get("sub") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(AuthError::Invalid("the token has no sub claim".into())),
        };
        let role = match claims.get("role") {
            // SET ROLE none means "back to the login role": the bridge's own.
            Some(Value::String(r)) if r.eq_ignore_ascii_case("none") => {
                return Err(AuthError::Invalid("the role claim names no role".into()))
            }
            Some(Value::String(r)) if !r.is_empty() => Some(r.clone()),
            None => self.default_role.clone(),
            Some(_) => return Err(AuthError::Invalid("the role claim must be a string".into())),
        };
        let expires_at = claims.get("exp").and_then(Value::as_u64);
        Ok(Identity {
            expires_at,
            subject: Some(actor.clone()),
            actor,
            role,
            claims_json: Value::Object(claims).to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    fn auth() -> Authenticator {
        let mut config = Config::new("postgres://x");
        config.jwt_secret = Some("secret".into());
        config.default_role = Some("app_user".into());
        Authenticator::from_config(&config).unwrap()
    }

    fn token(claims: Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
        )
        .unwrap()
    }

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    #[test]
    fn a_valid_token_names_actor_and_role() {
        let t = token(
            json!({"sub": "ann", "role": "editor", "exp": now() + 60}),
            "secret",
        );
        let id = auth().identify(Some(&t), "c1").unwrap();
        assert_eq!(id.actor, "ann");
        assert_eq!(id.role.as_deref(), Some("editor"));
        let t = token(json!({"sub": "bob", "exp": now() + 60}), "secret");
        assert_eq!(
            auth().identify(Some(&t), "c1").unwrap().role.as_deref(),
            Some("app_user")
        );
    }

    #[test]
    fn bad_tokens_are_refused() {
        let a = auth();
        assert!(matches!(a.identify(None, "c"), Err(AuthError::Missing)));
        let expired = token(json!({"sub": "ann", "exp": now() - 3600}), "secret");
        assert!(matches!(
            a.identify(Some(&expired), "c"),
            Err(AuthError::Invalid(_))
        ));
        let forged = token(json!({"sub": "ann", "exp": now() + 60}), "other");
        assert!(matches!(
            a.identify(Some(&forged), "c"),
            Err(AuthError::Invalid(_))
        ));
        let no_exp = token(json!({"sub": "ann"}), "secret");
        assert!(matches!(
            a.identify(Some(&no_exp), "c"),
            Err(AuthError::Invalid(_))
        ));
        assert!(matches!(
            a.identify(Some("not.a.token"), "c"),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn client_ids_are_scoped_by_subject_without_collisions() {
        let id = |sub: &str| Identity {
            actor: sub.into(),
            role: None,
            claims_json: "{}".into(),
            subject: Some(sub.into()),
            expires_at: None,
        };
        assert_eq!(id("ann").scoped_client_id("tab"), "ann/tab");
        assert_ne!(
            id("a/b").scoped_client_id("c"),
            id("a").scoped_client_id("b/c")
        );
        assert_ne!(
            id("a\\").scoped_client_id("c"),
            id("a").scoped_client_id("\\/c")
        );
        let t = token(
            json!({"sub": "x", "role": "NONE", "exp": now() + 60}),
            "secret",
        );
        assert!(matches!(
            auth().identify(Some(&t), "c"),
            Err(AuthError::Invalid(_))
        ));
    }
}
